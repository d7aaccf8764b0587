"""Evaluate a trained loravl model on a validation split: retrieval R@1/5/10 (ITC and ITM re-ranked) and captioning
(exact match, BLEU-4, CIDEr). The console script ``loravl-evaluate`` is the same.

    python src/evaluate.py --checkpoint checkpoints/stage1/latest [--config configs/x.yaml] [--output metrics.json]
"""
import sys

from loravl.cli import evaluate as main

if __name__ == "__main__":
    sys.exit(main())
