"""The data layer through its public API: every format gives the same samples, broken files are skipped and
counted, ranks split an epoch, and a resumed loader continues exactly where it stopped."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2


from loravl.config import ConfigError, DataConfig
from loravl.data import (COLOURS, RELATIONS, SHAPES, DataFormatError, TooManySkippedError,
                         build_dataloader, build_dataset, build_transform, ensure_demo_data,
                         load_rgb_image)
from loravl.data.images import jpeg_frame
from loravl.data.skips import Skip

IMAGE_SIZE = 32
TRAIN_SIZE, VAL_SIZE = 24, 12


# Demo data and converters into every format


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_size=TRAIN_SIZE, val_size=VAL_SIZE,
                            image_size=48, seed=0)


def demo_rows(root: Path, split: str) -> list[dict]:
    lines = (root / split / "captions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def write_coco(root: Path, rows: list[dict], src: Path) -> Path:
    """COCO layout: annotations/captions_val2017.json + val2017/<file_name>."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for i, row in enumerate(rows):
        name = f"{i:012d}.png"
        shutil.copy(src / row["image"], root / "val2017" / name)
        images.append({"id": 1000 + i, "file_name": name, "width": 48, "height": 48})
        annotations.append({"id": i, "image_id": 1000 + i, "caption": row["caption"]})
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def write_karpathy(root: Path, rows: list[dict], src: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(src / "images", root / "val2014")
    entries = [{"image": "val2014/" + Path(r["image"]).name, "caption": [r["caption"]], "image_id": f"coco_{i}"}
               for i, r in enumerate(rows)]
    (root / "coco_karpathy_val.json").write_text(json.dumps(entries))
    return root / "coco_karpathy_val.json"


def write_csv(root: Path, rows: list[dict], src: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(src / "images", root / "pics")
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "text"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"url": "pics/" + Path(r["image"]).name, "text": r["caption"]})
    return root / "pairs.csv"


def write_imagefolder(root: Path, rows: list[dict], src: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for r in rows:
            name = Path(r["image"]).name
            shutil.copy(src / r["image"], root / name)
            f.write(json.dumps({"file_name": name, "caption": r["caption"]}) + "\n")
    return root


def write_shards(root: Path, rows: list[dict], src: Path, per_shard: int) -> str:
    """WebDataset tars: <key>.png + <key>.json ({"caption": ...}) or .txt, alternating."""
    root.mkdir(parents=True)
    count = 0
    for shard in range(0, len(rows), per_shard):
        with tarfile.open(root / f"{count:05d}.tar", "w") as tar:
            for i, r in enumerate(rows[shard:shard + per_shard], start=shard):
                caption_ext, caption = (("json", json.dumps({"caption": r["caption"]})) if i % 2
                                        else ("txt", r["caption"]))
                for ext, data in (("png", (src / r["image"]).read_bytes()), (caption_ext, caption.encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count += 1
    return str(root / ("{00000..%05d}.tar" % (count - 1)))


def epoch_samples(cfg: DataConfig, split: str = "val", num_workers: int = 0) -> list[tuple[str, bytes]]:
    """(caption, pixel bytes) of one eval epoch, through the public API."""
    loader = build_dataloader(build_dataset(cfg, split, IMAGE_SIZE), cfg, 5, train=False, seed=0,
                              num_workers=num_workers, drop_last=False)
    out = []
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["pixel_values"].dtype == torch.uint8 and batch["image_ids"].dtype == torch.long
        assert not batch["skipped"]
        out += [(c, p.numpy().tobytes()) for c, p in zip(batch["captions"], batch["pixel_values"])]
    return out


def test_every_format_reads_the_same_demo_content(demo_root, tmp_path):
    rows = demo_rows(demo_root, "val")
    src = demo_root / "val"
    cfgs = {
        "demo": DataConfig(format="demo", train_path=str(demo_root), demo_train_size=TRAIN_SIZE,
                           demo_val_size=VAL_SIZE, demo_image_size=48),
        "jsonl": DataConfig(format="jsonl", train_path="unused", val_path=str(src / "captions.jsonl")),
        "coco": DataConfig(format="coco", train_path="unused", val_path=str(write_coco(tmp_path / "coco", rows, src))),
        "karpathy": DataConfig(format="karpathy", train_path="unused",
                               val_path=str(write_karpathy(tmp_path / "karpathy", rows, src))),
        "csv": DataConfig(format="csv", train_path="unused", val_path=str(write_csv(tmp_path / "csv", rows, src)),
                          image_column="url", text_column="text"),
        "hf": DataConfig(format="hf", train_path="unused",
                         val_path=str(write_imagefolder(tmp_path / "hf", rows, src))),
        "webdataset": DataConfig(format="webdataset", train_path="unused",
                                 val_path=write_shards(tmp_path / "wds", rows, src, per_shard=5)),
    }
    cfgs["hf_streaming"] = DataConfig(format="hf", train_path="unused", val_path=cfgs["hf"].val_path, streaming=True)
    expected = sorted(epoch_samples(cfgs["jsonl"]))
    assert len(expected) == VAL_SIZE
    assert [c for c, _ in expected] == sorted(r["caption"] for r in rows)
    for name, cfg in cfgs.items():
        assert sorted(epoch_samples(cfg)) == expected, name


def test_hf_saved_dataset_and_missing_column(demo_root, tmp_path):
    import datasets

    rows = demo_rows(demo_root, "val")
    folder = write_imagefolder(tmp_path / "imgs", rows, demo_root / "val")
    saved = tmp_path / "saved"
    datasets.load_dataset(str(folder), split="train").rename_column("caption", "text").save_to_disk(str(saved))
    cfg = DataConfig(format="hf", train_path=str(saved), text_column="text")
    assert sorted(c for c, _ in epoch_samples(cfg, "train")) == sorted(r["caption"] for r in rows)
    with pytest.raises(ConfigError, match=r"no column 'caption' \(data.text_column\)"):
        build_dataset(DataConfig(format="hf", train_path=str(saved)), "train", IMAGE_SIZE)


def test_wrong_paths_and_columns_fail_at_start_naming_them(demo_root, tmp_path):
    manifest = demo_root / "train" / "captions.jsonl"
    not_objects = tmp_path / "not_objects.jsonl"
    not_objects.write_text(manifest.read_text().splitlines()[0] + "\n5\n")
    cases = [
        (DataConfig(format="jsonl", train_path=str(tmp_path / "nope.jsonl")), "nope.jsonl"),
        (DataConfig(format="jsonl", train_path=str(manifest), text_column="text"), "no field 'text'"),
        (DataConfig(format="coco", train_path=str(tmp_path / "captions.json")), "captions.json"),
        (DataConfig(format="webdataset", train_path=str(tmp_path / "s-{000..002}.tar")), "s-000.tar"),
        (DataConfig(format="hf", train_path=str(tmp_path / "no_dataset")), "no_dataset"),
        (DataConfig(format="jsonl", train_path=str(not_objects)), r"not_objects.jsonl:2: a JSON int, not an object"),
    ]
    for cfg, message in cases:
        with pytest.raises(DataFormatError, match=message):
            build_dataset(cfg, "train", IMAGE_SIZE)
    assert issubclass(DataFormatError, ValueError)


def test_auto_num_workers_shares_the_cores_between_the_processes_of_a_host(tmp_path, demo_root, monkeypatch):
    """data.num_workers auto: the cores this process may use, divided among torchrun's LOCAL_WORLD_SIZE
    processes, less one for each training process; a number is taken as it is."""
    from loravl.data.loader import resolve_num_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers("auto") == 15 and resolve_num_workers(3) == 3
    for processes, workers in (("2", 7), ("8", 1), ("16", 0), ("32", 0)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        assert resolve_num_workers("auto") == workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    (tmp_path / "a.png").write_bytes((demo_root / "val/images/000000.png").read_bytes())
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a"}))
    cfg = DataConfig(format="jsonl", train_path=str(tmp_path / "m.jsonl"), num_workers="auto")
    loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 1, train=True, seed=0)
    assert loader.loader.num_workers == 2


def test_the_demo_with_paraphrases_has_the_same_scenes_and_true_captions(demo_root, tmp_path):
    """data.demo_captions_per_image: 5 captions a scene, the first the one-caption set's, in a folder of its own;
    every paraphrase names the scene's two objects and relation (or its inverse, objects swapped)."""
    cfg = DataConfig(format="demo", train_path=str(tmp_path / "demo"), val_path=str(tmp_path / "demo"),
                     demo_train_size=TRAIN_SIZE, demo_val_size=VAL_SIZE, demo_image_size=48,
                     demo_captions_per_image=5)
    val = next(iter(build_dataloader(build_dataset(cfg, "val", IMAGE_SIZE), cfg, VAL_SIZE, train=False, seed=0,
                                     num_workers=0)))
    assert (tmp_path / "demo" / f"train{TRAIN_SIZE}_val{VAL_SIZE}_48px_seed0_captions5").is_dir()
    single = demo_rows(demo_root, "val")
    assert [refs[0] for refs in val["all_captions"]] == [r["caption"] for r in single]
    for refs in val["all_captions"]:
        assert len(set(refs)) == 5
        words = refs[0].split()  # a <colour> <shape> <relation...> a <colour> <shape>
        a, b = " ".join(words[1:3]), " ".join(words[-2:])
        assert all(a in r and b in r for r in refs), refs
        assert refs[1].startswith(f"a {b} ") and refs[1].endswith(f" a {a}"), refs
    with pytest.raises(ConfigError, match="demo_captions_per_image"):
        DataConfig(demo_captions_per_image=6).validate("data")


def test_several_captions_per_image_share_an_id(tmp_path, demo_root):
    (tmp_path / "a.png").write_bytes((demo_root / "val/images/000000.png").read_bytes())
    (tmp_path / "b.png").write_bytes((demo_root / "val/images/000001.png").read_bytes())
    lines = [{"image": "a.png", "caption": f"first {i}"} for i in range(4)] + [{"image": "b.png", "caption": "b"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = DataConfig(format="jsonl", train_path=str(tmp_path / "m.jsonl"), val_path=str(tmp_path / "m.jsonl"))
    val = next(iter(build_dataloader(build_dataset(cfg, "val", IMAGE_SIZE), cfg, 8, train=False, seed=0,
                                     num_workers=0)))
    assert val["image_ids"].tolist() == [0, 1]
    assert val["all_captions"] == [[f"first {i}" for i in range(4)], ["b"]]
    # Training draws one caption per image per epoch, the same for the same (seed, epoch).
    train = build_dataset(cfg, "train", IMAGE_SIZE)
    build_dataloader(train, cfg, 2, train=True, seed=5, num_workers=0)
    picks = [train[(0, epoch)]["caption"] for epoch in range(12)]
    assert picks == [train[(0, epoch)]["caption"] for epoch in range(12)]
    assert len(set(picks)) > 1


# Broken files


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb from the header's view)."""
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def good_image_bytes() -> dict[str, bytes]:
    red = Image.new("RGB", (40, 30), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40x30, shown 30x40
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return {
        "rgb.jpg": _save(red, "JPEG"),
        "gray.png": _save(Image.new("L", (40, 30), 128), "PNG"),
        "palette_transparent.png": _save(palette, "PNG", transparency=0),
        "rgba.png": _save(Image.new("RGBA", (40, 30), (0, 0, 255, 0)), "PNG"),
        "cmyk.jpg": _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "sixteen_bit.png": _save(Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), "PNG"),
        "photo.webp": _save(red, "WEBP"),
        "exif_rotated.jpg": _save(red, "JPEG", exif=exif),
    }


def broken_files() -> dict[str, tuple[bytes, str]]:
    jpeg = _save(Image.new("RGB", (64, 64), (0, 128, 0)), "JPEG")
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt_image"),
        "empty.jpg": (b"", "empty_file"),
        "not_an_image.jpg": (b"this is a text file, not a picture\n" * 10, "not_an_image"),
        "tiny.png": (_save(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        "big.png": (_save(Image.new("RGB", (1200, 1000)), "PNG"), "decompression_bomb"),  # > max_image_pixels
        "header_bomb.png": (_png_with_declared_size(40000, 40000), "decompression_bomb"),  # > PIL's global limit
    }


def _jpeg_with_exif(image: Image.Image, byte_order: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif.endian = byte_order
    exif[0x010F] = "maker"  # tags before and after the orientation's
    exif[0x0112] = orientation
    exif[0x0131] = "software"
    return _save(image, "JPEG", exif=exif)


def test_tensor_decoding_gives_pils_pixels_and_its_skips():
    """as_tensor=True (the loader's path: JPEGs through torchvision's decode_jpeg) gives exactly the pixels of the
    PIL path, every EXIF orientation in either byte order included, and the same Skip reasons for broken files, a
    JPEG cut anywhere included."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    cases = {**good_image_bytes(), "gray.jpg": _save(Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)),
                                                     "JPEG"),
             "progressive.jpg": _save(photo, "JPEG", progressive=True),
             "subsampling 4:4:4": _save(photo, "JPEG", subsampling=0), "odd size": _save(photo.resize((77, 51)), "JPEG"),
             **{f"EXIF orientation {o} {order}": _jpeg_with_exif(photo, order, o) for o in range(1, 9)
                for order in "<>"}}
    for name, data in cases.items():
        pil = load_rgb_image(data, max_pixels=10**7, min_size=2)
        tensor = load_rgb_image(data, max_pixels=10**7, min_size=2, as_tensor=True)
        assert tensor.dtype == torch.uint8 and torch.equal(tensor, torch.from_numpy(np.array(pil)).permute(2, 0, 1)), name
    jpeg = _save(photo, "JPEG", quality=90)
    broken = {**broken_files(), **{f"cut at {f}": (jpeg[: int(len(jpeg) * f)], "corrupt_image") for f in (0.3, 0.9)}}
    for name, (data, reason) in broken.items():
        assert load_rgb_image(data, max_pixels=10**6, min_size=2, as_tensor=True).reason == reason, name


def _jpeg_with_declared_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims another size (a header bomb when large)."""
    data = bytearray(_save(Image.new("RGB", (16, 16), (0, 90, 0)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_frame_reads_the_header_pil_reads():
    """The loader's fast path sizes a JPEG from its frame header, past APP segments (EXIF, ICC), in every
    coding PIL writes; anything else is not taken for a JPEG."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "baseline": (_save(photo, "JPEG"), 0xC0, 3),
        "progressive": (_save(photo, "JPEG", progressive=True), 0xC2, 3),
        "exif and icc": (_save(photo, "JPEG", exif=exif, icc_profile=b"\0" * 3000), 0xC0, 3),
        "grey": (_save(photo.convert("L"), "JPEG"), 0xC0, 1),
        "cmyk": (_save(photo.convert("CMYK"), "JPEG"), 0xC0, 4),
    }
    for name, (data, marker, components) in cases.items():
        frame = jpeg_frame(data)
        with Image.open(io.BytesIO(data)) as image:
            assert (frame.width, frame.height) == image.size == (70, 45), name
        assert (frame.marker, frame.components, frame.precision) == (marker, components, 8), name
    jpeg = cases["exif and icc"][0]
    for not_a_frame in (b"", b"\xff\xd8", jpeg[:200], _save(photo, "PNG"), b"\xff\xd8\xff\xe0\x00\x01" + jpeg[6:]):
        assert jpeg_frame(not_a_frame) is None
    # The fast path's checks say what PIL's do on the same header, a too-large or too-small frame.
    for size, reason in (((5000, 4000), "decompression_bomb"), ((40000, 40000), "decompression_bomb"),
                         ((1, 16), "too_small")):
        data = _jpeg_with_declared_size(*size)
        for as_tensor in (True, False):
            assert load_rgb_image(data, max_pixels=10**7, min_size=2, as_tensor=as_tensor).reason == reason


def test_image_modes_end_as_rgb_with_the_right_content():
    images = {name: load_rgb_image(data, max_pixels=10**7, min_size=2) for name, data in good_image_bytes().items()}
    for name, image in images.items():
        assert isinstance(image, Image.Image) and image.mode == "RGB", name
    pixel = {name: image.getpixel((5, 5)) for name, image in images.items()}
    assert pixel["palette_transparent.png"] == (255, 255, 255)  # transparent index composited on white
    assert pixel["rgba.png"] == (255, 255, 255)
    assert pixel["sixteen_bit.png"] == (255, 255, 255)  # 65535 -> 255, not clipped garbage
    assert pixel["gray.png"] == (128, 128, 128)
    assert pixel["cmyk.jpg"][0] > 200 and pixel["cmyk.jpg"][1] < 60
    assert images["exif_rotated.jpg"].size == (30, 40) and images["rgb.jpg"].size == (40, 30)
    # Large JPEGs are decoded at reduced scale (draft) but never below the size asked for.
    big = load_rgb_image(_save(Image.new("RGB", (1600, 1200)), "JPEG"), max_pixels=10**7, min_size=2,
                         target_size=224)
    assert big.size == (400, 300)
    big_tensor = load_rgb_image(_save(Image.new("RGB", (1600, 1200)), "JPEG"), max_pixels=10**7, min_size=2,
                                target_size=224, as_tensor=True)  # the loader's path: PIL's draft too
    assert big_tensor.shape == (3, 300, 400) and big_tensor.dtype == torch.uint8


def _channels_last(pixels: torch.Tensor) -> bool:
    return pixels.permute(1, 2, 0).is_contiguous()


def test_transforms_give_uint8_rgb_matching_pillow_within_one_level():
    # Channels differ (R across, G down, B constant), so a transposed or channel-swapped tensor would fail.
    x, y = np.meshgrid(np.linspace(0, 255, 90), np.linspace(0, 255, 60))
    array = np.stack([x, y, np.full_like(x, 40)], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    # eval: the short side to 32, centre crop, as Pillow's antialiased bilinear resize does it
    expected = np.asarray(image.resize((48, 32), Image.BILINEAR).crop((8, 0, 40, 32)), dtype=int)
    out = build_transform(32, train=False)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32) and _channels_last(out)
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1
    # train: the same seed gives the same crop; the crop keeps the image's layout
    train = build_transform(32, train=True, crop_scale=(0.9, 1.0))
    first = train(image, random.Random(3))
    assert torch.equal(first, train(image, random.Random(3))) and first.dtype == torch.uint8
    red, green = first[0].float(), first[1].float()
    assert red[:, -1].mean() > red[:, 0].mean() + 100 and green[-1].mean() > green[0].mean() + 100
    assert (first[2] == 40).all()


def test_transforms_are_torchvisions_pixel_for_pixel():
    rng = np.random.default_rng(0)
    for height, width in ((60, 90), (90, 60), (50, 50), (32, 70)):
        array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        pixels = torch.from_numpy(array).permute(2, 0, 1)  # channels-last, as decoded
        sources = (Image.fromarray(array), pixels, pixels.contiguous())
        # eval: torchvision's Resize (short side) and CenterCrop
        expected = v2.CenterCrop(32)(v2.Resize(32, antialias=True)(pixels.contiguous()))
        for source in sources:
            out = build_transform(32, train=False)(source)
            assert _channels_last(out) and torch.equal(out, expected), (height, width, type(source))
        # train: the crop torchvision's resized_crop (and horizontal_flip) makes from the same parameters
        for hflip in (False, True):
            crop = build_transform(32, train=True, crop_scale=(0.3, 1.0), hflip=hflip)
            flips = 0
            for seed in range(12):
                top, left, h, w = crop.crop_params(height, width, random.Random(seed))
                expected = v2.functional.resized_crop(pixels.contiguous(), top, left, h, w, [32, 32],
                                                      antialias=True)
                draws = random.Random(seed)
                crop.crop_params(height, width, draws)
                if hflip and draws.random() < 0.5:
                    expected, flips = v2.functional.horizontal_flip(expected), flips + 1
                for source in sources:
                    out = crop(source, random.Random(seed))
                    assert _channels_last(out) and torch.equal(out, expected), (height, width, hflip, seed)
            assert (flips > 0) == hflip


def test_train_crop_samples_as_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    crop = build_transform(224, train=True, crop_scale=(0.3, 1.0))
    ours = [crop.crop_params(480, 640, random.Random(seed)) for seed in range(3000)]
    theirs = []
    for seed in range(3000):
        torch.manual_seed(seed)
        theirs.append(RandomResizedCrop.get_params(torch.empty(3, 480, 640), [0.3, 1.0], [3 / 4, 4 / 3]))
    for params in (ours, theirs):
        for top, left, h, w in params:
            assert 0 <= top <= 480 - h and 0 <= left <= 640 - w
            assert 0.3 * 480 * 640 - 700 <= h * w <= 480 * 640 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # The same distribution: area and (log-uniform) aspect ratio, and where the crop sits.
    def stats(params):
        p = np.asarray(params, dtype=float)
        area = p[:, 2] * p[:, 3] / (480 * 640)
        return area.mean(), np.log(p[:, 3] / p[:, 2]).mean(), (p[:, 0] + p[:, 2] / 2).mean() / 480
    assert np.allclose(stats(ours), stats(theirs), atol=0.015), (stats(ours), stats(theirs))
    # No crop fits 10x200 at 99% of its area in these ratios: both fall back to the same central crop.
    fallback = build_transform(8, train=True, crop_scale=(0.99, 1.0)).crop_params(10, 200, random.Random(0))
    assert fallback == tuple(RandomResizedCrop.get_params(torch.empty(3, 10, 200), [0.99, 1.0], [3 / 4, 4 / 3]))


def test_broken_samples_are_skipped_and_counted_over_a_full_epoch(tmp_path):
    rows = []
    for name, data in good_image_bytes().items():
        (tmp_path / name).write_bytes(data)
        rows.append({"image": name, "caption": f"good {name}"})
    expected = Counter()
    for name, (data, reason) in broken_files().items():
        (tmp_path / name).write_bytes(data)
        rows.append({"image": name, "caption": f"bad {name}"})
        expected[reason] += 1
    rows.append({"image": "missing.jpg", "caption": "gone"})
    expected["missing_file"] += 1
    rows.append({"image": "rgb.jpg", "caption": "   "})
    rows.append({"image": "gray_copy.png", "caption": ""})
    (tmp_path / "gray_copy.png").write_bytes(good_image_bytes()["gray.png"])
    expected["empty_caption"] += 1  # rgb.jpg keeps its good caption; gray_copy.png has none
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(format="jsonl", train_path=str(tmp_path / "m.jsonl"), max_image_pixels=1_000_000,
                     max_skip_fraction=1.0, prefetch_factor=2)
    for train, workers in ((True, 2), (False, 0)):
        loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE, train=train), cfg, 4, train=train,
                                  seed=0, num_workers=workers, drop_last=False)
        kept = [c for batch in loader for c in batch["captions"]]
        assert sorted(kept) == sorted(f"good {name}" for name in good_image_bytes()), (train, workers)
        assert loader.skips.reasons == expected, (train, workers)
        assert loader.skips.seen == len(kept) + sum(expected.values())
        # The epoch's log line names the first skipped files of each reason, with the reason.
        from loravl.metrics import format_skips
        line = format_skips(loader.skips)
        assert "missing.jpg (missing_file" in line and "truncated.jpg (corrupt_image" in line, line
        assert all(len(names) <= 3 for names in loader.skips.examples.values()) and "BytesIO" not in line


def test_a_mostly_broken_dataset_stops(tmp_path):
    (tmp_path / "ok.png").write_bytes(good_image_bytes()["gray.png"])
    rows = [{"image": "ok.png", "caption": "fine"}] + [{"image": f"gone{i}.jpg", "caption": "x"} for i in range(9)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(format="jsonl", train_path=str(tmp_path / "m.jsonl"), max_skip_fraction=0.5)
    loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 4, train=True, seed=0, num_workers=0,
                              drop_last=False)
    with pytest.raises(TooManySkippedError, match="missing_file: 9"):
        list(loader)


# Distribution and resume


def test_two_ranks_under_torchrun_split_the_epoch(demo_root, tmp_path):
    shards = write_shards(tmp_path / "wds", demo_rows(demo_root, "train"), demo_root / "train", per_shard=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "data_rank_worker.py"), str(demo_root), shards, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for kind in ("jsonl", "webdataset"):
        first, second = seen[0][kind], seen[1][kind]
        assert first and second, kind
        assert not set(first) & set(second), kind
        assert len(first) + len(second) == TRAIN_SIZE, kind
    assert sorted(seen[0]["jsonl"] + seen[1]["jsonl"]) == list(range(TRAIN_SIZE))


def _batches(loader, limit=None):
    out = []
    for batch in loader:
        out.append((batch["image_ids"].tolist(), batch["captions"], batch["pixel_values"].sum().item()))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("kind,workers", [("jsonl", 0), ("jsonl", 2), ("webdataset", 0), ("webdataset", 2),
                                          ("webdataset_one_shard", 2)])
def test_resume_mid_epoch_yields_exactly_the_rest(demo_root, tmp_path, kind, workers):
    rows = demo_rows(demo_root, "train")
    if kind == "jsonl":
        cfg = DataConfig(format="jsonl", train_path=str(demo_root / "train" / "captions.jsonl"))
    else:
        per_shard = TRAIN_SIZE if kind == "webdataset_one_shard" else 4
        # A window smaller than a shard, so resume lands inside a shuffled window.
        cfg = DataConfig(format="webdataset", train_path=write_shards(tmp_path / "w", rows, demo_root / "train",
                                                                      per_shard), stream_shuffle_window=5)
    cfg.prefetch_factor = 2

    def make_loader():
        loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 3, train=True, seed=7,
                                  num_workers=workers)
        loader.set_epoch(2)
        return loader

    full = _batches(make_loader())
    assert sum(len(ids) for ids, _, _ in full) == TRAIN_SIZE - (TRAIN_SIZE % 3)
    interrupted = make_loader()
    head = _batches(interrupted, limit=3)
    state = interrupted.state_dict()
    assert head == full[:3]
    resumed = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 3, train=True, seed=7,
                               num_workers=workers)
    resumed.load_state_dict(json.loads(json.dumps(state)) if workers == 0 and kind == "jsonl" else state)
    assert resumed.epoch == 2
    assert _batches(resumed) == full[3:]
    # The next epoch is a different order of the same images.
    resumed.set_epoch(3)
    next_epoch = _batches(resumed)
    assert [ids for ids, _, _ in next_epoch] != [ids for ids, _, _ in full]
    assert sorted(i for ids, _, _ in next_epoch for i in ids) == sorted(i for ids, _, _ in full for i in ids)


@pytest.mark.parametrize("saved_workers,resumed_workers", [(2, 0), (0, 1)])
def test_resume_with_another_worker_count_yields_the_same_rest(demo_root, saved_workers, resumed_workers):
    """data.num_workers may change at a resume (``auto`` on another host): a map-style loader starts its sampler at
    the saved position and yields the same batches, pixels included (torchdata's worker states do not fit)."""
    cfg = DataConfig(format="jsonl", train_path=str(demo_root / "train" / "captions.jsonl"), prefetch_factor=2)

    def make_loader(workers):
        loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 3, train=True, seed=7,
                                  num_workers=workers)
        loader.set_epoch(1)
        return loader

    full = _batches(make_loader(saved_workers), limit=8)
    interrupted = make_loader(saved_workers)
    assert _batches(interrupted, limit=3) == full[:3]
    state = interrupted.state_dict()
    resumed = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 3, train=True, seed=7,
                               num_workers=resumed_workers)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and _batches(resumed, limit=5) == full[3:8]


def test_workers_reuse_shared_memory_batches_without_touching_yielded_ones(demo_root):
    """Two workers write their batches into reused shared-memory slots: every batch of two epochs, all kept until
    the end, equals the main process's own (no workers, no slots), while the batches outnumber the slots used."""
    cfg = DataConfig(format="jsonl", train_path=str(demo_root / "train" / "captions.jsonl"), prefetch_factor=2)

    def epochs(workers):
        loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 3, train=True, seed=1,
                                  num_workers=workers)
        batches = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches += [(batch["image_ids"].tolist(), batch["pixel_values"]) for batch in loader]
        return batches, loader

    reused, loader = epochs(2)
    own, _ = epochs(0)
    assert [ids for ids, _ in reused] == [ids for ids, _ in own] and len(own) == 2 * (TRAIN_SIZE // 3)
    for (_, got), (_, expected) in zip(reused, own):
        assert torch.equal(got, expected)
        assert got.permute(0, 2, 3, 1).is_contiguous()  # channels-last, as the transforms give them
    assert "pixel_slot" not in loader.loader.collate_fn(
        [build_dataset(cfg, "train", IMAGE_SIZE)[(0, 0)]])  # no slot outside a worker
    slots_used = len(loader._slot_pixels)
    assert 2 <= slots_used <= 2 * loader.slots.slots_per_worker < len(reused)
    # Only the batches decoded ahead (the next epoch's) hold a slot: every one read was released.
    assert sum(loader.slots.flags) <= 2 * cfg.prefetch_factor


def test_the_train_loader_decodes_the_next_epoch_before_it_starts(demo_root):
    """At an epoch's end a map-style train loader's workers go on into the next epoch (so the trainer's first
    step of it need not wait for a batch to be decoded), and the epochs it yields are those of a loader started
    at each epoch. Setting an epoch other than the next one starts a new pass there."""
    import time

    cfg = DataConfig(format="jsonl", train_path=str(demo_root / "train" / "captions.jsonl"), prefetch_factor=2)

    def loader_at(epoch, workers=2):
        loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 4, train=True, seed=5,
                                  num_workers=workers)
        loader.set_epoch(epoch)
        return loader

    fresh = {epoch: _batches(loader_at(epoch, workers=0)) for epoch in (0, 1, 4)}
    loader = loader_at(0)
    assert _batches(loader) == fresh[0]
    deadline = time.time() + 30
    while sum(loader.slots.flags) < 2 * cfg.prefetch_factor:  # both workers fill their queue with epoch 1
        assert time.time() < deadline, "no batch of the next epoch was decoded ahead"
        time.sleep(0.05)
    loader.set_epoch(1)
    assert _batches(loader, limit=2) == fresh[1][:2]
    loader.set_epoch(4)  # mid-epoch, another epoch: a new pass from its start
    assert _batches(loader) == fresh[4]
    eval_loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE, train=False), cfg, 4, train=False,
                                   seed=5, num_workers=2)
    first_pass = _batches(eval_loader)
    time.sleep(0.3)
    assert not any(eval_loader.slots.flags)  # an eval loader stops with its epoch
    assert _batches(eval_loader) == first_pass


def test_demo_vocab_and_determinism(tmp_path):
    a = ensure_demo_data(tmp_path / "a", train_size=30, val_size=5, image_size=40, seed=1)
    b = ensure_demo_data(tmp_path / "b", train_size=30, val_size=5, image_size=40, seed=1)
    for split in ("train", "val"):
        assert (a / split / "captions.jsonl").read_text() == (b / split / "captions.jsonl").read_text()
    assert (a / "train/images/000007.png").read_bytes() == (b / "train/images/000007.png").read_bytes()
    mtime = (a / "train/captions.jsonl").stat().st_mtime_ns
    ensure_demo_data(tmp_path / "a", train_size=30, val_size=5, image_size=40, seed=1)
    assert (a / "train/captions.jsonl").stat().st_mtime_ns == mtime  # complete: not regenerated
    for row in demo_rows(a, "train"):
        words = row["caption"].split()
        assert words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES
        relation = " ".join(words[3:-3])
        assert relation in RELATIONS and words[-2] in COLOURS and words[-1] in SHAPES
        # The caption is a function of the picture: the named relation holds between the two colour blobs.
        pixels = np.asarray(Image.open(a / "train" / row["image"]).convert("RGB")).astype(int)
        centres = []
        for colour in (words[1], words[-2]):
            mask = np.abs(pixels - np.array(COLOURS[colour])).sum(-1) < 30
            ys, xs = np.nonzero(mask)
            centres.append((xs.mean(), ys.mean()))
        if words[1] == words[-2]:
            continue
        (x1, y1), (x2, y2) = centres
        assert {"left of": x1 < x2 - 8, "right of": x1 > x2 + 8, "above": y1 < y2 - 8,
                "below": y1 > y2 + 8}[relation], row


def test_skip_marker_is_not_a_sample():
    assert isinstance(load_rgb_image(b"", max_pixels=10, min_size=1), Skip)


def test_tokenize_runs_in_collate_and_merges_its_fields(demo_root, tiny_tokenizer):
    cfg = DataConfig(format="jsonl", train_path=str(demo_root / "train" / "captions.jsonl"), prefetch_factor=2)
    loader = build_dataloader(build_dataset(cfg, "train", IMAGE_SIZE), cfg, 4, train=True, seed=0,
                              num_workers=2, tokenize=tiny_tokenizer)
    batch = next(iter(loader))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 4
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert torch.equal(batch["input_ids"], tiny_tokenizer(batch["captions"])["input_ids"])


def test_demo_sets_of_other_sizes_live_side_by_side(tmp_path, caplog):
    """A run asking for other demo sizes on the same path gets a folder of its own: the set another run is reading
    is never regenerated under it, and a complete set is not generated again."""
    import logging

    with caplog.at_level(logging.INFO, logger="loravl.data.demo"):
        small = ensure_demo_data(tmp_path / "demo", train_size=4, val_size=2, image_size=32)
        written = {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
        other = ensure_demo_data(tmp_path / "demo", train_size=6, val_size=2, image_size=32)
        again = ensure_demo_data(tmp_path / "demo", train_size=4, val_size=2, image_size=32)
    assert small != other and again == small and small.parent == other.parent == tmp_path / "demo"
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()} == written
    assert len((other / "train" / "captions.jsonl").read_text().splitlines()) == 6
    generated = [r.getMessage() for r in caplog.records if "Generating the demo set" in r.getMessage()]
    assert len(generated) == 2 and str(other) in generated[1]
