"""Probe: is nvJPEG (torchvision decode_jpeg on cuda) fast enough to feed the step, and what does it cost the SMs?

    python3 bench/gpu_decode_rate.py     # on a GPU machine; writes $OUT/nvjpeg_probe.json (BENCHMARKS.md, 2026-12-01 s4)
"""
import json, os, sys, time, threading, subprocess
from pathlib import Path
import torch, torchvision
from torchvision.io import decode_jpeg, ImageReadMode
sys.path.insert(0, "bench")
from throughput import crop_boxes, encoded_jpegs, gpu_crops
out = Path(os.environ.get("OUT", "/tmp"))
res = {"torch": torch.__version__, "torchvision": torchvision.__version__}
res["lscpu"] = subprocess.run("lscpu | egrep 'Model name|Thread|Core|Socket|MHz|^CPU\\(s\\)'", shell=True, capture_output=True, text=True).stdout
print(res["lscpu"], flush=True)
files = encoded_jpegs(Path("/tmp/probe_jpegs"), 2048)
res["mean_kb"] = sum(f.numel() for f in files) / len(files) / 1024
torch.set_num_threads(1)
t0 = time.perf_counter()
for f in files[:300]: decode_jpeg(f, mode=ImageReadMode.RGB)
res["cpu_decode_ms"] = (time.perf_counter() - t0) / 300 * 1e3
print(res, flush=True)
dev = torch.device("cuda")
B = 128
batches = [files[i:i + B] for i in range(0, 2048, B)]
for b in batches[:3]: decode_jpeg(b, mode=ImageReadMode.RGB, device=dev)
torch.cuda.synchronize()
for B2 in (128, 256):
    bl = [files[i:i + B2] for i in range(0, 2048, B2)]
    host = []; t0 = time.perf_counter()
    for b in bl:
        h0 = time.perf_counter(); decode_jpeg(b, mode=ImageReadMode.RGB, device=dev); host.append(time.perf_counter() - h0)
    torch.cuda.synchronize(); wall = time.perf_counter() - t0
    res[f"gpu_decode_batch{B2}"] = {"img_s": 2048 / wall, "host_ms_per_call": 1e3 * sum(host) / len(host)}
    print(B2, res[f"gpu_decode_batch{B2}"], flush=True)
# interference: bf16 matmuls alone vs with decoding in a thread
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
def mm(n):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): a @ bm
    torch.cuda.synchronize(); return time.perf_counter() - t0
mm(20); alone = mm(400)
stop = [False]; count = [0]
def dec():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        while not stop[0]:
            decode_jpeg(batches[count[0] % len(batches)], mode=ImageReadMode.RGB, device=dev); count[0] += 1
        s.synchronize()
th = threading.Thread(target=dec); th.start(); time.sleep(0.5); c0 = count[0]
both = mm(400); c1 = count[0]; stop[0] = True; th.join()
res["matmul_400_alone_s"] = alone; res["matmul_400_with_decode_s"] = both
res["decode_img_s_during_matmul"] = (c1 - c0) * B / both
print(res, flush=True)
# crop + resize on the GPU: roi_align over a padded uint8->float batch, and a per-image loop
import torch.nn.functional as F
imgs = decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=dev)
boxes = crop_boxes(B, dev)
def roi():
    return gpu_crops(imgs, boxes)
def loop():
    return torch.stack([F.interpolate(im[None, :, 20:420, 10:510].float(), size=(224, 224), mode="bilinear", antialias=True, align_corners=False)[0] for im in imgs]).round_().clamp_(0, 255).to(torch.uint8)
for name, fn in (("roi_align", roi), ("interp_loop", loop)):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t0 = time.perf_counter(); h = 0
    for _ in range(20):
        h0 = time.perf_counter(); fn(); h += time.perf_counter() - h0
    torch.cuda.synchronize(); w = (time.perf_counter() - t0) / 20
    res[name] = {"ms_per_batch": w * 1e3, "host_ms": h / 20 * 1e3}
    print(name, res[name], flush=True)
a1, a2 = roi().float(), loop().float()
res["roi_vs_interp_mean_abs"] = (a1 - a2).abs().mean().item(); res["roi_vs_interp_max_abs"] = (a1 - a2).abs().max().item()
print(res, flush=True)
(out / "nvjpeg_probe.json").write_text(json.dumps(res, indent=1))
