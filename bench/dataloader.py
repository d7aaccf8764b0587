"""Data loader throughput: JPEG files -> batches of image_size uint8 tensors, end to end.

Generates (once) a folder of photo-sized JPEGs with a JSONL manifest, or takes any jsonl manifest, then runs one
training epoch through loravl.data for each worker count and reports images/s in total and per worker.
``--transforms tensor,pillow`` also runs the loader's previous transform (Pillow crop and resize, float32
normalised on the CPU) in the same run, for comparison.

    python bench/dataloader.py --workers 0,1,2 --images 2000
    python bench/dataloader.py --workers 14 --transforms tensor,pillow --images 6000
    python bench/dataloader.py --manifest /data/cc3m/train.jsonl --workers 4,8,16 --max-batches 300
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


from loravl.config import DataConfig
from loravl.data import IMAGENET_MEAN, IMAGENET_STD, build_dataloader, build_dataset


class PillowFloatTransform:
    """The training transform before 2026-12-01, the baseline: Pillow's crop and resize, then float32 normalised in
    numpy, so batches are 4 bytes a channel value to collate, pin and copy."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float]):
        from torchvision.transforms import v2

        self.crop = v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True)
        std = np.asarray(IMAGENET_STD, dtype=np.float32)
        self.scale, self.offset = 1.0 / (255.0 * std), np.asarray(IMAGENET_MEAN, dtype=np.float32) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.crop(image), dtype=np.float32) * self.scale - self.offset
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def make_jpeg_folder(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """Smooth colour fields with noise and edges: compresses like a photo (~40-70 KB at 640x480, quality 90)."""
    manifest = folder / "captions.jsonl"
    if manifest.is_file() and sum(1 for _ in open(manifest)) == count:
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(manifest, "w") as f:
        for i in range(count):
            coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
            noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.int16)
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            name = f"images/{i:06d}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=90)
            f.write(json.dumps({"image": name, "caption": f"synthetic photo {i}"}) + "\n")
    return manifest


def run_one(manifest: Path, workers: int, batch_size: int, image_size: int, prefetch: int,
            max_batches: int, transform: str = "tensor") -> dict:
    cfg = DataConfig(format="jsonl", train_path=str(manifest), num_workers=workers, prefetch_factor=prefetch)
    dataset = build_dataset(cfg, "train", image_size)
    if transform == "pillow":
        dataset.builder.transform = PillowFloatTransform(image_size, (cfg.crop_scale_min, 1.0))
    elif transform != "tensor":
        raise SystemExit(f"--transforms: unknown {transform!r} (tensor, pillow)")
    loader = build_dataloader(dataset, cfg, batch_size, train=True, seed=0)
    loader.set_epoch(0)
    start = time.perf_counter()
    first_batch_s = None
    images = steady_images = batches = 0
    for batch in loader:
        n = batch["pixel_values"].shape[0]
        images += n
        batches += 1
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        else:
            steady_images += n
        if max_batches and batches >= max_batches:
            break
    total_s = time.perf_counter() - start
    # Persistent workers would go on filling the prefetch queue (prefetch x workers batches) while the next
    # configuration is timed: stop them now.
    dtype = str(batch["pixel_values"].dtype) if batches else None
    skipped = loader.skips.skipped
    del loader
    gc.collect()
    steady_s = total_s - (first_batch_s or 0.0)
    steady = steady_images / steady_s if steady_s > 0 else float("nan")
    return {
        "transform": transform, "dtype": dtype, "workers": workers, "images": images, "batches": batches,
        "seconds": round(total_s, 3),
        "first_batch_seconds": round(first_batch_s or 0.0, 3),
        "images_per_s_end_to_end": round(images / total_s, 1),
        "images_per_s_steady": round(steady, 1),
        "images_per_s_per_worker": round(steady / max(workers, 1), 1),
        "skipped": skipped, "workers_left": len(multiprocessing.active_children()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="a jsonl manifest (image, caption); default: generate JPEGs")
    parser.add_argument("--folder", default="/tmp/loravl_bench_jpegs", help="where generated JPEGs go")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--transforms", default="tensor",
                        help="tensor (the loader's), pillow (its previous transform, for comparison), or both")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--max-batches", type=int, default=0, help="stop each run after this many (0: one epoch)")
    parser.add_argument("--out", default="runs/bench_dataloader.json")
    args = parser.parse_args()

    manifest = Path(args.manifest) if args.manifest else make_jpeg_folder(Path(args.folder), args.images,
                                                                          args.width, args.height)
    results = []
    print(f"{'transform':>9} {'workers':>7} {'images':>7} {'first batch s':>13} {'img/s e2e':>10} "
          f"{'img/s steady':>12} {'img/s/worker':>12}")
    for transform in args.transforms.split(","):
        for workers in [int(w) for w in args.workers.split(",")]:
            r = run_one(manifest, workers, args.batch_size, args.image_size, args.prefetch, args.max_batches,
                        transform)
            results.append(r)
            print(f"{r['transform']:>9} {r['workers']:>7} {r['images']:>7} {r['first_batch_seconds']:>13} "
                  f"{r['images_per_s_end_to_end']:>10} {r['images_per_s_steady']:>12} "
                  f"{r['images_per_s_per_worker']:>12}", flush=True)
    report = {
        "manifest": str(manifest), "batch_size": args.batch_size, "image_size": args.image_size,
        "source_size": f"{args.width}x{args.height}" if not args.manifest else "as given",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
        "cuda": torch.cuda.is_available(), "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
