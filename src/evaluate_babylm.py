"""Zero-shot scores on the BabyLM challenge's tasks (BLiMP, its supplement, EWoK, Winoground, VQA) from the
challenge's files in a local folder. The console script ``loravl-babylm`` is the same.

    python src/evaluate_babylm.py --checkpoint checkpoints/stage1/latest --data evaluation_data/full_eval \
        [--tasks blimp,blimp_supplement,ewok,winoground,vqa] [--out babylm_results.json]
"""
import sys

from loravl.cli import babylm as main

if __name__ == "__main__":
    sys.exit(main())
