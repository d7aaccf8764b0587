"""Per-sample CPU cost of each loader stage, in one process (no workers).

    JPEGS=/tmp/stage_jpegs python3 bench/loader_stages.py   # writes $OUT/stages.json (or /tmp/stages.json)
"""
import json, os, sys, time, pickle, io
from pathlib import Path
import torch
sys.path.insert(0, "bench"); sys.path.insert(0, "src")
from throughput import write_jpegs
from loravl.config import DataConfig
from loravl.data import build_dataset
from loravl.data.images import decode_jpeg_rgb, load_rgb_image
from loravl.data.collate import CaptionCollator
from multiprocessing.reduction import ForkingPickler; import torch.multiprocessing
torch.set_num_threads(1)
folder = Path(os.environ.get("JPEGS", "/tmp/stage_jpegs")); n = 600
if not (folder / "manifest.jsonl").exists(): write_jpegs(folder, n)
ds = build_dataset(DataConfig(format="jsonl", train_path=str(folder / "manifest.jsonl")), "train", 224)
files = [(folder / f"img{i:06d}.jpg") for i in range(n)]
res = {}
def t(name, fn, reps=n):
    for i in range(20): fn(i)
    t0 = time.perf_counter()
    for i in range(reps): fn(i)
    res[name] = (time.perf_counter() - t0) / reps * 1e3; print(f"{name:36s} {res[name]:.3f} ms", flush=True)
datas = [f.read_bytes() for f in files]
t("read_bytes", lambda i: files[i].read_bytes())
t("decode_jpeg_rgb", lambda i: decode_jpeg_rgb(datas[i]))
t("load_rgb_image(path)", lambda i: load_rgb_image(files[i], max_pixels=10**9, min_size=8, as_tensor=True))
img = [decode_jpeg_rgb(datas[i]) for i in range(20)]
tr = ds.builder.transform
t("transform", lambda i: tr(img[i % 20]))
t("dataset[(i, 0)]", lambda i: ds[(i, 0)])
samples = [ds[(i, 0)] for i in range(128)]
col = CaptionCollator(224)
t("collate 128 (per sample)", lambda i: col(samples), reps=20); res["collate 128 (per sample)"] /= 128
def share(i):
    b = col(samples)
    buf = io.BytesIO(); ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(b)
t("collate+share 128 (per sample)", share, reps=20); res["collate+share 128 (per sample)"] /= 128
print(json.dumps(res))
Path(os.environ.get("OUT", "/tmp")).joinpath("stages.json").write_text(json.dumps(res, indent=1))
