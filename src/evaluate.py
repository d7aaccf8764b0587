"""Evaluate a trained loravl model on a validation split: retrieval R@1/5/10 (ITC and ITM re-ranked) and captioning
(exact match, BLEU-4, CIDEr).

    python src/evaluate.py --checkpoint checkpoints/stage1/latest [--config configs/x.yaml] [--output metrics.json]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from loravl.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
