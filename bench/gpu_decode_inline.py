"""Probe 3: decode the next batch inline (one thread) while the step runs on a side stream; decode stream priority.

    python3 bench/gpu_decode_inline.py   # writes $OUT/nvjpeg_probe3.json
"""
import json, os, sys, time
from pathlib import Path
import torch
from torchvision.io import decode_jpeg, ImageReadMode
sys.path.insert(0, "bench")
from throughput import gpu_crops, probe_batches
out = Path(os.environ.get("OUT", "/tmp"))
dev = torch.device("cuda"); B = 128
batches, boxes = probe_batches(B, dev)
res = {}
x = torch.randn(B * 257, 768, device=dev, dtype=torch.bfloat16); w = torch.randn(768, 3072, device=dev, dtype=torch.bfloat16)
w2 = torch.randn(3072, 768, device=dev, dtype=torch.bfloat16)
gs = torch.cuda.Stream()
with torch.cuda.stream(gs):
    for _ in range(3): (x @ w) @ w2
gs.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    y = x
    for _ in range(64): y = ((y @ w).relu() @ w2) * 0.01 + x
def decode(k, stream):
    with torch.cuda.stream(stream):
        t0 = time.perf_counter()
        imgs = decode_jpeg(batches[k % len(batches)], mode=ImageReadMode.RGB, device=dev)
        t1 = time.perf_counter()
        yy = gpu_crops(imgs, boxes)
        ev = torch.cuda.Event(); ev.record(stream)
    return yy, ev, t1 - t0, time.perf_counter() - t1
def run(mode, priority, steps=60):
    step_stream = torch.cuda.Stream() if mode != "default" else torch.cuda.default_stream()
    dstream = torch.cuda.Stream(priority=priority)
    dec_t = post_t = 0.0
    with torch.cuda.stream(step_stream):
        item = decode(0, dstream) if mode != "none" else None
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for i in range(steps):
            if item is not None:
                yy, ev, _, _ = item
                step_stream.wait_event(ev); yy.record_stream(step_stream); yy.float().mean()
            g.replay()
            if mode != "none":
                item = decode(i + 1, dstream); dec_t += item[2]; post_t += item[3]
            if i % 10 == 9: step_stream.synchronize()
        torch.cuda.synchronize(); wall = time.perf_counter() - t0
    return {"ms_per_step": wall / steps * 1e3, "decode_host_ms": dec_t / steps * 1e3, "crop_host_ms": post_t / steps * 1e3}
for mode, pr in (("none", 0), ("side", 0), ("side", -1), ("default", -1), ("none", 0)):
    r = run(mode, pr); res[f"{mode}_prio{pr}"] = r; print(mode, pr, r, flush=True)
(out / "nvjpeg_probe3.json").write_text(json.dumps(res, indent=1))
