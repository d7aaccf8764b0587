"""Fine-tune an image classifier on a frozen vision backbone with one adapter; see docs/lora_variants.md.

    python src/finetune_classifier.py --adapter lora --data /data/my_imagefolder [--backbone facebook/dinov2-base]
    python src/finetune_classifier.py --adapter bitfit --data flowers102 --backbone checkpoints/stage1/latest
    python src/finetune_classifier.py --adapter lora_fa --data /data/hf_saved_dataset --backbone fastvit_t8
"""
import sys

from loravl.cli import finetune as main

if __name__ == "__main__":
    sys.exit(main())
