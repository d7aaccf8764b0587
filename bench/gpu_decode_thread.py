"""Probe 2: does nvJPEG decoding in a thread overlap a 'training step' running on the default stream or a side stream?

    python3 bench/gpu_decode_thread.py   # writes $OUT/nvjpeg_probe2.json
"""
import json, os, sys, time, threading, queue
from pathlib import Path
import torch
from torchvision.io import decode_jpeg, ImageReadMode
sys.path.insert(0, "bench")
from throughput import gpu_crops, probe_batches
out = Path(os.environ.get("OUT", "/tmp"))
dev = torch.device("cuda"); B = 128
batches, boxes = probe_batches(B, dev)
res = {}
def decode_batch(k, stream):
    with torch.cuda.stream(stream):
        imgs = decode_jpeg(batches[k % len(batches)], mode=ImageReadMode.RGB, device=dev)
        y = gpu_crops(imgs, boxes)
        ev = torch.cuda.Event(); ev.record(stream)
    return y, ev
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
def make_graph(stream):
    with torch.cuda.stream(stream):
        for _ in range(3): a @ bm
    stream.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(18): c = a @ bm   # ~25 ms, a stand-in for the step
    return g
def run(step_stream, with_decode, steps=60):
    g = make_graph(torch.cuda.Stream())
    q = queue.Queue(maxsize=2); stop = [False]
    def producer():
        s = torch.cuda.Stream(); k = 0
        while not stop[0]:
            item = decode_batch(k, s); k += 1
            while not stop[0]:
                try: q.put(item, timeout=0.1); break
                except queue.Full: pass
    th = None
    if with_decode:
        th = threading.Thread(target=producer, daemon=True); th.start()
    waits = 0.0
    with torch.cuda.stream(step_stream):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for i in range(steps):
            if with_decode:
                w0 = time.perf_counter(); y, ev = q.get(); waits += time.perf_counter() - w0
                torch.cuda.current_stream().wait_event(ev); y.record_stream(torch.cuda.current_stream())
                y.float().mean()
            g.replay()
            if i % 10 == 9: torch.cuda.current_stream().synchronize()
        torch.cuda.synchronize(); wall = time.perf_counter() - t0
    stop[0] = True
    if th: th.join()
    return {"ms_per_step": wall / steps * 1e3, "queue_wait_ms_per_step": waits / steps * 1e3}
for name, stream in (("default", torch.cuda.default_stream()), ("side", torch.cuda.Stream())):
    for dec in (False, True):
        r = run(stream, dec); res[f"{name}_stream_decode={dec}"] = r; print(name, dec, r, flush=True)
# GIL: python loop iterations in 50 ms with and without a decoding thread
def spin(t=0.2):
    n = 0; t0 = time.perf_counter()
    while time.perf_counter() - t0 < t: n += 1
    return n
res["spin_alone"] = spin()
stop = [False]
def dec_loop():
    s = torch.cuda.Stream(); k = 0
    while not stop[0]: decode_batch(k, s); k += 1
th = threading.Thread(target=dec_loop); th.start(); time.sleep(0.1)
res["spin_with_decode_thread"] = spin(); stop[0] = True; th.join()
print(res, flush=True)
(out / "nvjpeg_probe2.json").write_text(json.dumps(res, indent=1))
