"""The GPU's share of decoding (loravl.data.gpu_decode), run on the CPU device: the same functions the trainer runs
on its GPU, where only the decoder (nvJPEG there, libjpeg-turbo here) differs (bench/gpu_decode_check.py)."""
from __future__ import annotations

import io
import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from loravl.config import ConfigError, DataConfig
from loravl.data import build_dataloader, build_dataset
from loravl.data.collate import CaptionCollator
from loravl.data.gpu_decode import (GPU_KEYS, decode_into, decodes_on_gpu, gpu_jpeg_frame, gpu_sample, pack_jpegs,
                                    resized_crops)
from loravl.data.images import RandomResizedCropUint8, jpeg_orientation, load_rgb_image, resize_uint8
from loravl.train import INPUT_KEYS, to_device


def _jpeg(width: int, height: int, seed: int, **save) -> bytes:
    """A photo-like JPEG: smooth colour noise, so that the resize has edges to round."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    base.resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def _exif(orientation: int, byte_order: str = "<") -> Image.Exif:
    exif = Image.Exif()
    exif.endian = byte_order
    exif[0x010F] = "maker"
    exif[0x0112] = orientation
    return exif


def test_resized_crops_are_the_cpu_resize_pixel_for_pixel():
    """Random images, crops and output sizes, downscaling and upscaling, flipped or not: the batched fixed-point
    products give ``resize_uint8``'s pixels exactly while a crop is under three times the output; one grey level
    at most beyond (float32 sums over 2**24)."""
    g = torch.Generator().manual_seed(0)

    def draw(low: int, high: int) -> int:  # in [low, high)
        return int(torch.randint(low, high, (1,), generator=g))

    worst_large = 0
    for trial in range(300):
        size = draw(8, 48)
        images, crops, expected = [], [], []
        for _ in range(3):
            height, width = draw(4, 200), draw(4, 200)
            image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
            h, w = draw(1, height + 1), draw(1, width + 1)
            top, left, flip = draw(0, height - h + 1), draw(0, width - w + 1), draw(0, 2)
            out = resize_uint8(image[:, top:top + h, left:left + w], (size, size))
            images.append(image)
            crops.append((top, left, h, w, flip))
            expected.append(out.flip(-1) if flip else out)
        got = resized_crops(images, torch.tensor(crops), size)
        for (_, _, h, w, _), g_out, e_out in zip(crops, got, expected):
            diff = (g_out.int() - e_out.int()).abs().max().item()
            if max(h, w) < 3 * size:
                assert diff == 0, (trial, h, w, size)
            else:
                worst_large = max(worst_large, diff)
    assert worst_large <= 1


def test_a_gpu_sample_is_the_cpu_sample_it_stands_for():
    """A JPEG picked for the GPU carries the caption, crop and flip the CPU path draws for the same (seed, epoch,
    key); decoded and written into its batch it is the CPU path's pixels."""
    transform = RandomResizedCropUint8(64, (0.5, 1.0), hflip=True)
    files = [_jpeg(160, 120, 0), _jpeg(90, 150, 1), _jpeg(64, 64, 2), _jpeg(121, 77, 3, subsampling=0)]
    for trial in range(10):
        samples, expected = [], []
        for k, data in enumerate(files):
            frame = gpu_jpeg_frame(data, max_pixels=10**7, min_size=2, target_size=91)
            assert frame is not None, k
            samples.append(gpu_sample(data, frame, transform, random.Random(trial * 7 + k)))
            image = load_rgb_image(data, max_pixels=10**7, min_size=2, as_tensor=True)
            expected.append(transform(image, random.Random(trial * 7 + k)))
        # two CPU-decoded rows around them, as a collated batch has
        batch = {"pixel_values": torch.zeros(6, 64, 64, 3, dtype=torch.uint8).permute(0, 3, 1, 2),
                 **pack_jpegs([{}, *samples, {}])}
        assert batch["gpu_positions"].tolist() == [1, 2, 3, 4]
        decode_into(batch, batch)
        assert torch.equal(batch["pixel_values"][1:5], torch.stack(expected)), trial
        assert batch["pixel_values"][0].sum() == 0 and batch["pixel_values"][5].sum() == 0


def test_files_the_gpu_does_not_take_go_to_the_cpu_path():
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 255, (60, 80, 3), dtype=np.uint8))

    def save(image, **kw):
        buffer = io.BytesIO()
        image.save(buffer, **kw)
        return buffer.getvalue()

    baseline = save(photo, format="JPEG")
    left_out = {"progressive": save(photo, format="JPEG", progressive=True),
                "grey": save(photo.convert("L"), format="JPEG"),
                "cmyk": save(photo.convert("CMYK"), format="JPEG"),
                "rotated by EXIF": save(photo, format="JPEG", exif=_exif(6)),
                "cut short": baseline[:-200],
                "png": save(photo, format="PNG"),
                "reduced-scale decode": _jpeg(400, 300, 5)}
    for name, data in left_out.items():
        assert gpu_jpeg_frame(data, max_pixels=10**7, min_size=2, target_size=100) is None, name
    assert gpu_jpeg_frame(baseline, max_pixels=10**7, min_size=2, target_size=100) is not None
    assert gpu_jpeg_frame(save(photo, format="JPEG", exif=_exif(1)), max_pixels=10**7, min_size=2,
                          target_size=None) is not None
    # the header checks give the CPU path's skips
    assert gpu_jpeg_frame(baseline, max_pixels=1000, min_size=2, target_size=None).reason == "decompression_bomb"
    assert gpu_jpeg_frame(baseline, max_pixels=10**7, min_size=70, target_size=None).reason == "too_small"


def test_jpeg_orientation_reads_every_tag_in_either_byte_order():
    photo = Image.new("RGB", (20, 10), (10, 200, 30))
    for byte_order in "<>":
        for orientation in range(1, 9):
            buffer = io.BytesIO()
            photo.save(buffer, "JPEG", exif=_exif(orientation, byte_order))
            assert jpeg_orientation(buffer.getvalue()) == orientation, (byte_order, orientation)
    no_tag = Image.Exif()
    no_tag[0x010F] = "maker"
    for exif in (None, no_tag):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", **({"exif": exif} if exif is not None else {}))
        assert jpeg_orientation(buffer.getvalue()) == 1


def test_the_share_is_an_even_spread_of_keys():
    for share in (0.1, 0.25, 0.5):
        picked = np.array([decodes_on_gpu(k, share) for k in range(20000)])
        assert abs(picked.mean() - share) < 0.002
        windows = picked[:19968].reshape(-1, 128).mean(1)  # any batch-sized run of keys gets about its share
        assert windows.min() > share - 0.05 and windows.max() < share + 0.05
    streamed = np.array([decodes_on_gpu((7 << 40) + k, 0.25) for k in range(4096)])  # large ids (webdataset)
    assert abs(streamed.mean() - 0.25) < 0.01
    assert not any(decodes_on_gpu(k, 0.0) for k in range(1000))
    assert all(decodes_on_gpu(k, 1.0) for k in range(1000))


@pytest.fixture
def jpeg_manifest(tmp_path):
    """24 JPEGs of several sizes, two of them files the GPU does not take: a progressive one, a cut one."""
    rows = []
    for i in range(24):
        data = _jpeg(100 + 7 * i, 140 - 3 * i, 10 + i, progressive=(i == 5))
        if i == 11:
            data = data[:-300]  # cut short
        (tmp_path / f"{i}.jpg").write_bytes(data)
        rows.append({"image": f"{i}.jpg", "caption": [f"picture {i}", f"image {i}"]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_with_a_gpu_share_gives_the_cpu_loaders_batches(jpeg_manifest, workers):
    """Two epochs from a loader whose train samples are all picked for the GPU, their JPEGs decoded by
    ``to_device``: the same captions, ids and pixels as the loader that decodes everything in its workers."""
    def epochs(share):
        cfg = DataConfig(format="jsonl", train_path=str(jpeg_manifest), prefetch_factor=2, gpu_decode_share=share,
                         hflip=True)
        loader = build_dataloader(build_dataset(cfg, "train", 48), cfg, 5, train=True, seed=3, num_workers=workers)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch in loader:
                carried = [k for k in GPU_KEYS if k in batch]
                batch["input_ids"] = batch["attention_mask"] = torch.zeros(len(batch["captions"]), 1)
                pixels = to_device(batch, INPUT_KEYS, torch.device("cpu"))["pixel_values"]
                out.append((batch["image_ids"].tolist(), batch["captions"], pixels, carried))
        return out

    on_gpu, on_cpu = epochs(1.0), epochs(0.0)
    assert len(on_gpu) == len(on_cpu) == 2 * (24 // 5)
    for (ids, captions, pixels, carried), (ids0, captions0, pixels0, carried0) in zip(on_gpu, on_cpu):
        assert (ids, captions) == (ids0, captions0)
        assert torch.equal(pixels, pixels0)
        assert carried == list(GPU_KEYS) and carried0 == []
    # every sample went to the GPU but the progressive one (decoded by a worker) and the cut one (the CPU path's
    # skip: libjpeg-turbo and PIL refuse it)
    cfg = DataConfig(format="jsonl", train_path=str(jpeg_manifest), gpu_decode_share=1.0)
    dataset = build_dataset(cfg, "train", 48)
    samples = [dataset[(index, 0)] for index in range(24)]
    assert samples[11].reason == "corrupt_image" and "pixel_values" in samples[5]
    assert all("jpeg" in s for i, s in enumerate(samples) if i not in (5, 11))


def test_a_jpeg_no_decoder_takes_trains_as_a_copy_of_another_sample(caplog):
    """A file whose header passes but whose data both decoders refuse: its row of every input is another sample's
    (the batch keeps its size), and the log says so."""
    good = _jpeg(64, 48, 7)
    header_end = good.index(b"\xff\xda")
    broken = good[:header_end] + b"\xff\xda\x00\x02" + b"\xff\xd9"  # a scan header cut to nothing, then the end
    frame = gpu_jpeg_frame(broken, max_pixels=10**7, min_size=2, target_size=None)
    assert frame is not None
    transform = RandomResizedCropUint8(32, (0.5, 1.0))
    samples = [gpu_sample(data, gpu_jpeg_frame(data, max_pixels=10**7, min_size=2, target_size=None), transform,
                          random.Random(i)) for i, data in enumerate([good, broken])]
    batch = {"pixel_values": torch.zeros(2, 32, 32, 3, dtype=torch.uint8).permute(0, 3, 1, 2),
             "image_ids": torch.tensor([10, 11]), "input_ids": torch.tensor([[1, 2], [3, 4]]), **pack_jpegs(samples)}
    with caplog.at_level(logging.WARNING, logger="loravl.data.gpu_decode"):
        decode_into(batch, batch)
    assert batch["image_ids"].tolist() == [10, 10] and batch["input_ids"].tolist() == [[1, 2], [1, 2]]
    assert torch.equal(batch["pixel_values"][1], batch["pixel_values"][0]) and batch["pixel_values"][0].sum() > 0
    assert "failed to decode" in caplog.text


def test_the_collator_leaves_gpu_rows_blank_and_carries_their_jpegs():
    transform = RandomResizedCropUint8(16, (0.5, 1.0))
    data = _jpeg(40, 30, 9)
    gpu = {**gpu_sample(data, gpu_jpeg_frame(data, max_pixels=10**7, min_size=2, target_size=None), transform,
                        random.Random(0)), "caption": "a", "captions": ["a"], "image_id": 1}
    cpu = {"pixel_values": torch.full((16, 16, 3), 7, dtype=torch.uint8).permute(2, 0, 1), "caption": "b",
           "captions": ["b"], "image_id": 2}
    batch = CaptionCollator(16)([cpu, gpu])
    assert batch["pixel_values"][0].min() == 7 and batch["pixel_values"][1].max() == 0
    assert batch["gpu_positions"].tolist() == [1]
    assert bytes(batch["gpu_jpegs"].numpy()) == data and batch["gpu_jpeg_offsets"].tolist() == [0, len(data)]
    assert "gpu_jpegs" not in CaptionCollator(16)([cpu])


def test_the_share_must_be_a_fraction():
    with pytest.raises(ConfigError, match="gpu_decode_share"):
        DataConfig(format="jsonl", train_path="x", gpu_decode_share=1.5).validate("data")


def test_broken_files_picked_for_the_gpu_give_the_cpu_paths_skips(tmp_path):
    """Missing, empty, unreadable-as-JPEG and oversized files picked for the GPU are skipped for the same reason
    as by the CPU path."""
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a picture\n" * 20)
    (tmp_path / "big.jpg").write_bytes(_jpeg(1200, 1000, 1))
    (tmp_path / "a_folder.jpg").mkdir()
    names = ["missing.jpg", "empty.jpg", "text.jpg", "big.jpg", "a_folder.jpg"]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"image": n, "caption": "c"}) + "\n" for n in names))

    def reasons(share):
        cfg = DataConfig(format="jsonl", train_path=str(manifest), gpu_decode_share=share, max_image_pixels=10**6)
        dataset = build_dataset(cfg, "train", 32)
        return [dataset[(i, 0)].reason for i in range(len(names))]

    assert reasons(1.0) == reasons(0.0) == ["missing_file", "empty_file", "not_an_image", "decompression_bomb",
                                            "missing_file"]
