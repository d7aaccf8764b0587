"""Test helper: train with the given overrides, then write this rank's weights (checkpoint_state_dict) to
<OUT_DIR>/rank_<r>.safetensors. Usage: train_dump_ranks.py OUT_DIR [--config ...] [overrides]."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from loravl.weights import save_weights
from loravl.config import main_config
from loravl.train import train

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    cfg = main_config(sys.argv[2:])
    model = train(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model.checkpoint_state_dict(), out_dir / f"rank_{os.environ.get('RANK', '0')}.safetensors")
