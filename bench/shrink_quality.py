"""What a shrunk copy (loravl.data.shrink) changes in the pixels the encoder sees, and what it saves in decoding.

Each JPEG is resized to the model's input size as the loader resizes (antialiased bilinear) straight from the
original and from its shrunk copy: PNG (the resize alone), JPEG with 4:2:0 chroma (the default) and with 4:4:4.
Reports the mean absolute difference in grey levels, the decode time on one core and the file size.

    python bench/shrink_quality.py --images 20                       # the bench's 640x480 JPEGs
    python bench/shrink_quality.py --folder photos/ --short_side 317
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


from loravl.data.images import decode_jpeg_rgb, load_rgb_image, resize_uint8
from loravl.data.shrink import ShrinkSettings, shrink_image


def pixels(data: bytes) -> torch.Tensor:
    return load_rgb_image(data, max_pixels=10**9, min_size=1, as_tensor=True)


def decode_ms(files: list[bytes], passes: int, repeats: int = 5) -> list[float]:
    """Mean decode time per file (torchvision's libjpeg-turbo, as the loader's workers), once per pass."""
    out = []
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(repeats):
            for data in files:
                decode_jpeg_rgb(data)
        out.append(1e3 * (time.perf_counter() - start) / (repeats * len(files)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="", help="JPEGs to use (default: the bench's, written to /tmp)")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--short_side", type=int, default=317)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--passes", type=int, default=3, help="decode timings, each over every image 5 times")
    p.add_argument("--out", default="shrink_quality.json")
    args = p.parse_args()
    torch.set_num_threads(1)  # one core, as in a loader worker
    if args.folder:
        paths = sorted(Path(args.folder).glob("*.jp*g"))[:args.images]
    else:
        from throughput import ensure_jpegs
        folder = Path("/tmp/loravl_shrink_quality")
        ensure_jpegs(folder, args.images)
        paths = [folder / f"img{i:06d}.jpg" for i in range(args.images)]
    originals = [path.read_bytes() for path in paths]
    size = (args.image_size, args.image_size)
    references = [resize_uint8(pixels(data), size).float() for data in originals]
    variants = {"PNG (the resize alone)": (".png", False), "JPEG 4:2:0 (default)": (".jpg", False),
                "JPEG 4:4:4 (--chroma_444)": (".jpg", True)}
    rows = [{"name": "original", "decode_ms": decode_ms(originals, args.passes),
             "kb": float(np.mean([len(d) for d in originals])) / 1e3}]
    for name, (suffix, chroma_444) in variants.items():
        settings = ShrinkSettings(args.short_side, chroma_444=chroma_444)
        shrunk = [shrink_image(data, suffix, settings)[0] for data in originals]
        if any(s is None for s in shrunk):
            raise SystemExit(f"an image is no larger than --short_side {args.short_side}")
        diffs = [float((resize_uint8(pixels(s), size).float() - ref).abs().mean()) for s, ref in zip(shrunk, references)]
        rows.append({"name": name, "mean_abs_diff": float(np.mean(diffs)), "max_image_mean_abs_diff": max(diffs),
                     "kb": float(np.mean([len(s) for s in shrunk])) / 1e3,
                     "decode_ms": decode_ms(shrunk, args.passes) if suffix == ".jpg" else None})
    print(f"{len(paths)} images, short side {args.short_side}, compared at {args.image_size} px")
    print(f"{'':28}{'mean diff':>10}{'max':>8}{'decode ms':>26}{'KB':>8}")
    for r in rows:
        decode = "-" if r["decode_ms"] is None else " / ".join(f"{t:.3f}" for t in r["decode_ms"])
        diff = f"{r['mean_abs_diff']:>10.2f}{r['max_image_mean_abs_diff']:>8.2f}" if "mean_abs_diff" in r else " " * 18
        print(f"{r['name']:<28}{diff}{decode:>26}{r['kb']:>8.0f}")
    Path(args.out).write_text(json.dumps({"images": [str(p) for p in paths], "short_side": args.short_side,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
