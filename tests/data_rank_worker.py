"""Run by tests/test_data.py under ``torchrun --nproc_per_node=2``: each rank loads one epoch of a map-style
(jsonl demo) and a streaming (webdataset) split and writes the image ids it saw to ``<out>/rank<r>.json``.

Usage: torchrun --nproc_per_node=2 tests/data_rank_worker.py DEMO_ROOT SHARD_PATTERN OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


import torch.distributed as dist

from loravl.config import DataConfig
from loravl.data import build_dataloader, build_dataset


def ids_of_epoch(cfg: DataConfig, rank: int, world_size: int, num_workers: int) -> list[int]:
    dataset = build_dataset(cfg, "train", 32)
    loader = build_dataloader(dataset, cfg, 4, train=True, seed=3, rank=rank, world_size=world_size,
                              drop_last=False, num_workers=num_workers)
    loader.set_epoch(1)
    return [int(i) for batch in loader for i in batch["image_ids"]]


def main() -> None:
    demo_root, shards, out_dir = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seen = {
        "jsonl": ids_of_epoch(DataConfig(format="jsonl", train_path=f"{demo_root}/train/captions.jsonl"),
                              rank, world_size, 0),
        "webdataset": ids_of_epoch(DataConfig(format="webdataset", train_path=shards, prefetch_factor=2),
                                   rank, world_size, 2),
        "local_rank": int(os.environ["LOCAL_RANK"]),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
