"""The episodic memory measured: how well it reads back what was written, and whether the captioner recalls it.

    python bench/memory_recall.py --out recall.json [--checkpoint checkpoints/demo] [--device cuda]

1. Read-back (no model): random latents (C = 128) written into K slots, read with the written latents as
   queries; the relative error ||read - written|| / ||written|| by N (latents an episode) and K.
2. Recall (with ``--checkpoint``, a demo model trained with model.memory.enabled): the demo's validation images,
   each paired with another image's caption (a derangement: a caption the pixels cannot give). Episodes of N
   pairs are written with ``model.write_memory``; each image is captioned with its episode's memory, with no
   memory, and with another episode's memory. Exact match against the written caption (and, with no memory,
   against the image's own caption).
"""
from __future__ import annotations

import argparse
import random

import torch

from common import write_results
from loravl.config import MemoryConfig
from loravl.memory import EpisodicMemory


def read_back_errors(slots: list[int], sizes: list[int], dim: int = 128, episodes: int = 8) -> list[dict]:
    rows = []
    for k in slots:
        torch.manual_seed(0)
        memory = EpisodicMemory(MemoryConfig(slots=k, dim=dim)).eval()
        for n in sizes:
            latents = torch.randn(episodes, n, dim)
            read = memory.read(latents, memory.write(latents))["latents"]
            error = ((read - latents).norm(dim=-1) / latents.norm(dim=-1)).mean().item()
            rows.append({"slots": k, "episode_size": n, "relative_error": error})
            print(f"K {k:4d}  N {n:4d}  relative error {error:.2e}", flush=True)
    return rows


def exact(candidates: list[str], references: list[str]) -> float:
    from loravl.evaluate import normalize_caption

    return sum(normalize_caption(c) == normalize_caption(r) for c, r in zip(candidates, references)) / len(references)


@torch.no_grad()
def recall(checkpoint: str, device: torch.device, sizes: list[int], images: int) -> list[dict]:
    from loravl.data import build_dataloader, build_dataset
    from loravl.generate import generate_captions
    from loravl.loading import load_model

    model, run_cfg = load_model(checkpoint, device)
    model.eval()
    data = build_dataset(run_cfg.data, "val", run_cfg.model.vision.image_size)
    loader = build_dataloader(data, run_cfg.data, images, train=False, seed=0, num_workers=0)
    batch = next(iter(loader))
    pixels, own = batch["pixel_values"][:images].to(device), batch["captions"][:images]
    count = len(own)
    rng = random.Random(0)
    order = list(range(count))
    while any(i == j or own[i] == own[j] for i, j in enumerate(order)):  # every image gets a caption not its own
        rng.shuffle(order)
    written = [own[j] for j in order]
    rows = []
    plain = generate_captions(model, pixels)
    for n in sizes:
        with_memory, other_memory = [], []
        starts = list(range(0, count - count % n, n))
        for e, start in enumerate(starts):
            part = slice(start, start + n)
            state = model.write_memory(pixels[part], written[part])
            with_memory += generate_captions(model, pixels[part], memory=state)
            other = starts[(e + 1) % len(starts)]  # the next episode's pairs
            other_state = model.write_memory(pixels[other:other + n], written[other:other + n])
            other_memory += generate_captions(model, pixels[part], memory=other_state)
        used = len(with_memory)
        row = {"episode_size": n, "images": used,
               "recall_with_memory": exact(with_memory, written[:used]),
               "recall_without_memory": exact(plain[:used], written[:used]),
               "recall_with_other_memory": exact(other_memory, written[:used]),
               "own_caption_without_memory": exact(plain[:used], own[:used]),
               "examples": [{"written": w, "with_memory": m, "without": p}
                            for w, m, p in list(zip(written, with_memory, plain))[:3]]}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "examples"}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--sizes", default="1,4,16,32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"read_back": read_back_errors([16, 32, 64], [1, 4, 16, 32, 64, 128])}
    if args.checkpoint:
        result["recall"] = recall(args.checkpoint, torch.device(args.device),
                                  [int(n) for n in args.sizes.split(",")], args.images)
    write_results(args.out, {"args": vars(args), **result})


if __name__ == "__main__":
    main()
