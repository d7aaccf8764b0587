"""Are a pinned loader's batches right with the workers' reused shared-memory slots? (CUDA: the pin thread's
copy is what frees a slot there, a path the CPU test suite cannot take.)

    python3 bench/loader_slots_check.py --jpegs /tmp/slot_jpegs    # prints PASSED or raises

Two epochs from 4 workers, every batch kept until the end, against the same batches from the main process alone.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from throughput import ensure_jpegs  # noqa: E402
from loravl.config import DataConfig  # noqa: E402
from loravl.data import build_dataloader, build_dataset  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--jpegs", default="/tmp/slot_jpegs")
parser.add_argument("--images", type=int, default=1024)
args = parser.parse_args()
folder = Path(args.jpegs)
ensure_jpegs(folder, args.images)
cfg = DataConfig(format="jsonl", train_path=str(folder / "manifest.jsonl"), prefetch_factor=2)


def epochs(workers):
    loader = build_dataloader(build_dataset(cfg, "train", 224), cfg, 64, train=True, seed=0, num_workers=workers)
    batches = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches += [batch["pixel_values"] for batch in loader]
    return batches, loader


reused, loader = epochs(4)
own, _ = epochs(0)
assert len(reused) == len(own) == 2 * (args.images // 64)
pinned = all(b.is_pinned() for b in reused) if torch.cuda.is_available() else None
same = all(torch.equal(a, b) for a, b in zip(reused, own))
slots = len(loader._slot_pixels)
print(f"{len(reused)} batches, pinned {pinned}, {slots} slots used, all equal to the main process's: {same}")
assert same and pinned is not False and 0 < slots < len(reused)
print("PASSED")
