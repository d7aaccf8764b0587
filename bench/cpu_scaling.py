"""How a loader worker's per-sample time grows with the number of processes decoding at once: N processes (no
DataLoader, no queues) each decode and crop the bench's JPEGs from memory for a fixed time.

    python3 bench/cpu_scaling.py --procs 1,4,8,12,14,16 --seconds 4      # writes $OUT/cpu_scaling.json

If the time a sample stays flat up to the core count, the cores are independent and any slowdown inside real
workers is the loader's own overhead; if it grows, the processes share something (hyperthread siblings behind
the VM's vCPUs, memory bandwidth, caches, a lower all-core clock).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from throughput import ensure_jpegs  # noqa: E402
from loravl.data.images import build_transform, decode_jpeg_rgb  # noqa: E402


def work(args) -> tuple[int, float]:
    folder, n, seconds, stage, start = args
    torch.set_num_threads(1)
    datas = [(folder / f"img{i:06d}.jpg").read_bytes() for i in range(n)]
    transform = build_transform(224, train=True)
    decoded = [decode_jpeg_rgb(d) for d in datas[:16]]
    while time.time() < start:  # all processes begin together
        time.sleep(0.001)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        i = count % n
        if stage == "decode":
            decode_jpeg_rgb(datas[i])
        elif stage == "crop":
            transform(decoded[i % 16])
        else:
            transform(decode_jpeg_rgb(datas[i]))
        count += 1
    return count, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,4,8,12,14,16")
    p.add_argument("--stages", default="sample,decode,crop")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--jpegs", default="/tmp/scaling_jpegs")
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    folder = Path(args.jpegs)
    ensure_jpegs(folder, args.n)
    rows = []
    ctx = mp.get_context("fork")
    for stage in args.stages.split(","):
        for procs in [int(x) for x in args.procs.split(",")]:
            with ctx.Pool(procs) as pool:
                start = time.time() + 1.0
                out = pool.map(work, [(folder, args.n, args.seconds, stage, start)] * procs)
            rate = sum(c / s for c, s in out)
            ms = sum(s / c for c, s in out) / procs * 1e3
            rows.append({"stage": stage, "procs": procs, "samples_per_s": round(rate, 1), "ms_a_sample": round(ms, 3)})
            print(f"{stage:7s} {procs:3d} procs  {rate:8.1f} samples/s  {ms:.3f} ms a sample, each", flush=True)
    Path(os.environ.get("OUT", "/tmp")).joinpath("cpu_scaling.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
