"""Stage-1 vision-language pretraining (the console script ``loravl-train`` is the same).

    torchrun --nproc_per_node=8 src/train_stage1_vision_language.py [--config configs/X.yaml] [--key value ...]
    accelerate launch src/train_stage1_vision_language.py ...
    python src/train_stage1_vision_language.py --config configs/demo.yaml

Without --config the real recipe in configs/stage1.yaml is trained.
"""
from loravl.cli import train as main

if __name__ == "__main__":
    main()
