"""Per-sample CPU cost of each loader stage, in one process (no workers).

    JPEGS=/tmp/stage_jpegs python3 bench/loader_stages.py   # writes $OUT/stages.json (or /tmp/stages.json)

Also times alternatives: simplejpeg's decoding (libjpeg-turbo's TurboJPEG API, if installed; not a dependency),
exact and with its inexact fast DCT and upsampling, against torchvision's decode_jpeg (the loader's); the train
crop through torchvision's v2 pipeline and the resize on the crop's view (the loader's before) against
the loader's ``RandomResizedCropUint8``.
"""
import io
import json
import os
import pickle
import random
import sys
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop, v2

sys.path.insert(0, "bench"); sys.path.insert(0, "src")
from throughput import ensure_jpegs  # noqa: E402
from loravl.config import DataConfig  # noqa: E402
from loravl.data import build_dataset  # noqa: E402
from loravl.data.collate import CaptionCollator  # noqa: E402
from loravl.data.images import decode_jpeg_rgb, load_rgb_image  # noqa: E402

torch.set_num_threads(1)
folder = Path(os.environ.get("JPEGS", "/tmp/stage_jpegs"))
n = 600
ensure_jpegs(folder, n)
ds = build_dataset(DataConfig(format="jsonl", train_path=str(folder / "manifest.jsonl")), "train", 224)
files = [(folder / f"img{i:06d}.jpg") for i in range(n)]
res = {}


def t(name, fn, reps=n, rounds=3, per=1):
    """The fastest of ``rounds`` passes over ``reps`` calls, ms a call (divided by ``per``: ms a sample)."""
    for i in range(20):
        fn(i)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(reps):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / reps / per * 1e3)
    res[name] = best
    print(f"{name:44s} {best:.3f} ms", flush=True)


datas = [f.read_bytes() for f in files]
tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
t("read_bytes", lambda i: files[i].read_bytes())
t("decode: torchvision decode_jpeg", lambda i: decode_jpeg(tensors[i], mode=ImageReadMode.RGB,
                                                            apply_exif_orientation=True))
try:
    import simplejpeg
except ImportError:
    simplejpeg = None
if simplejpeg is not None:
    t("decode: simplejpeg", lambda i: simplejpeg.decode_jpeg(datas[i], colorspace="RGB"))
    t("decode: simplejpeg fastdct", lambda i: simplejpeg.decode_jpeg(datas[i], colorspace="RGB", fastdct=True))
    t("decode: simplejpeg fastdct+fastupsample", lambda i: simplejpeg.decode_jpeg(datas[i], colorspace="RGB",
                                                                                 fastdct=True, fastupsample=True))
t("decode_jpeg_rgb (the loader's)", lambda i: decode_jpeg_rgb(datas[i]))
t("load_rgb_image(path)", lambda i: load_rgb_image(files[i], max_pixels=10**9, min_size=8, as_tensor=True))
img = [decode_jpeg_rgb(datas[i]) for i in range(20)]
pipeline = v2.Compose([v2.RandomResizedCrop(224, scale=(0.5, 1.0), antialias=True), lambda x: x.contiguous()])
t("crop+resize: torchvision v2 pipeline", lambda i: pipeline(img[i % 20]))


def strided_crop(i):
    """The loader's transform before 2026-12-01's sixth session: the resize on the crop's view, channels-first out."""
    pixels = img[i % 20]
    top, left, h, w = RandomResizedCrop.get_params(pixels, [0.5, 1.0], [3 / 4, 4 / 3])
    crop = pixels[:, top:top + h, left:left + w].unsqueeze(0)
    return torch.nn.functional.interpolate(crop, size=(224, 224), mode="bilinear", antialias=True)[0].contiguous()


t("crop+resize: on the crop's view (before)", strided_crop)
tr = ds.builder.transform
t("crop+resize: the loader's transform", lambda i: tr(img[i % 20], random.Random(i)))
t("dataset[(i, 0)]", lambda i: ds[(i, 0)])
samples = [ds[(i, 0)] for i in range(128)]
col = CaptionCollator(224)
t("collate 128 (per sample)", lambda i: col(samples), reps=20, per=128)


def share(i):
    b = col(samples)
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(b)


t("collate+share 128 (per sample)", share, reps=20, per=128)
print(json.dumps(res))
Path(os.environ.get("OUT", "/tmp")).joinpath("stages.json").write_text(json.dumps(res, indent=1))
