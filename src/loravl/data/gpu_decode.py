"""A share of the train JPEGs decoded on the training process's GPU (nvJPEG) instead of by the loader's workers.

Decoding is most of a worker's time, and on some hosts the workers cannot keep up with the GPU's step
(BENCHMARKS.md). ``data.gpu_decode_share`` moves that share of the train images to the GPU:

- In the worker (``gpu_sample``): the file is read and its header checked as the CPU path checks it (the same
  skips); the caption, crop box and flip are drawn from the sample's own generator in the CPU path's order, so a
  sample is the same crop whichever side decodes it. The encoded bytes travel in the batch, not pixels.
- In the training process (``decode_into``, from ``loravl.train.to_device``): the batch's JPEGs are decoded on the
  device in one call, cropped and resized with torch's antialiased bilinear weights as two matrix products over
  all of them, flipped, and written into the batch's pixels before the step.

The share is a fixed set of sample keys (``decodes_on_gpu``), the same every epoch, on every rank and in a resumed
run. Only baseline colour JPEGs that are upright, complete (end marker present), at most 2 MP and decoded at full
scale go to the GPU; any other file takes the CPU path. The resize is the CPU path's, pixel for pixel
(tests/test_gpu_decode.py); nvJPEG's decode may differ from libjpeg-turbo's by its own rounding, which
bench/gpu_decode_check.py measures on a GPU (not run yet, BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from loravl.data.images import (JpegFrame, RandomResizedCropUint8, checked_jpeg_frame, jpeg_orientation,
                                needs_reduced_decode)
from loravl.data.skips import Skip

log = logging.getLogger(__name__)

# Start-of-frame markers nvJPEG's batched decode takes: baseline and extended sequential Huffman.
_SEQUENTIAL_SOF_MARKERS = (0xC0, 0xC1)
# Larger images take the CPU path: the batch's decoded images are padded to the largest one on the device.
MAX_GPU_PIXELS = 1 << 21
# The keys a batch carries its encoded JPEGs in (CaptionCollator), present only when it has some.
GPU_KEYS = ("gpu_jpegs", "gpu_jpeg_offsets", "gpu_positions", "gpu_crops")

_GOLDEN_64 = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio, odd


def decodes_on_gpu(key: int, share: float) -> bool:
    """Whether sample ``key`` is in the GPU's share: keys whose multiple of the golden ratio falls below ``share``
    (mod 1, in exact integers: any key, a streamed sample's large ids too), a set spread evenly over any run of
    keys."""
    return share > 0 and ((key * _GOLDEN_64) & 0xFFFFFFFFFFFFFFFF) < share * 2.0 ** 64


def gpu_jpeg_frame(data: Union[bytes, bytearray, memoryview], *, max_pixels: int, min_size: int,
                   target_size: Optional[int]) -> Union[JpegFrame, Skip, None]:
    """The frame of a JPEG the GPU can take; the CPU path's Skip where its header fails the same checks; None for
    a file to leave to the CPU path (not a baseline colour JPEG, rotated by EXIF, cut short, large, or one that
    path decodes at a reduced scale)."""
    frame = checked_jpeg_frame(data, max_pixels=max_pixels, min_size=min_size)
    if not isinstance(frame, JpegFrame):
        return frame
    if (frame.marker not in _SEQUENTIAL_SOF_MARKERS or frame.components != 3
            or frame.width * frame.height > MAX_GPU_PIXELS or needs_reduced_decode(frame, target_size)
            # a cut file: libjpeg-turbo decodes what is there, nvJPEG may fail the whole batch on it
            or bytes(data[-2:]) != b"\xff\xd9"
            or jpeg_orientation(data) != 1):
        return None
    return frame


def gpu_sample(data: Union[bytes, bytearray, memoryview], frame: JpegFrame, transform: RandomResizedCropUint8,
               rng) -> dict[str, Any]:
    """A sample's encoded JPEG and its crop (top, left, height, width, flip), drawn from ``rng`` as
    ``transform(image, rng)`` draws them."""
    top, left, height, width = transform.crop_params(frame.height, frame.width, rng)
    flip = transform.hflip and rng.random() < 0.5
    return {"jpeg": np.frombuffer(data, dtype=np.uint8), "crop": (top, left, height, width, int(flip))}


def pack_jpegs(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The batch's GPU share as tensors: the JPEGs' bytes end to end with their offsets, each one's position in
    the batch, its crop. Empty when no sample has a JPEG."""
    positions = [i for i, s in enumerate(samples) if "jpeg" in s]
    if not positions:
        return {}
    encoded = [samples[i]["jpeg"] for i in positions]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return {"gpu_jpegs": torch.from_numpy(np.concatenate(encoded)),
            "gpu_jpeg_offsets": torch.from_numpy(offsets),
            "gpu_positions": torch.tensor(positions, dtype=torch.long),
            "gpu_crops": torch.tensor([samples[i]["crop"] for i in positions], dtype=torch.long)}


def decode_into(batch: dict[str, Any], inputs: dict[str, torch.Tensor]) -> None:
    """Decode ``batch``'s JPEGs on the device of ``inputs["pixel_values"]`` and write their crops into it.

    A JPEG that neither nvJPEG nor libjpeg-turbo decodes (its header passed the worker's checks) cannot be dropped
    from a batch of fixed size any more: its row of every input becomes a copy of a decoded sample's, and a
    warning says so."""
    pixels = inputs["pixel_values"]
    device, size = pixels.device, pixels.shape[-1]
    offsets = batch["gpu_jpeg_offsets"].tolist()
    data = batch["gpu_jpegs"]
    encoded = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    images = _decode(encoded, device)
    failed = [i for i, image in enumerate(images) if image is None]
    for i in failed:  # a black stand-in its crop box fits in; the row is replaced below
        top, left, height, width, _ = batch["gpu_crops"][i].tolist()
        images[i] = torch.zeros(3, top + height, left + width, dtype=torch.uint8, device=device)
    crops = batch["gpu_crops"].to(device, non_blocking=True)
    positions = batch["gpu_positions"].to(device, non_blocking=True)
    pixels.index_copy_(0, positions, resized_crops(images, crops, size))
    if failed:
        bad = {int(batch["gpu_positions"][i]) for i in failed}
        good = [p for p in range(pixels.shape[0]) if p not in bad]
        if not good:
            raise RuntimeError(f"none of the batch's {len(encoded)} JPEGs decoded (data.gpu_decode_share)")
        for n, p in enumerate(sorted(bad)):
            for tensor in inputs.values():
                tensor[p] = tensor[good[n % len(good)]]
        log.warning("%d JPEG(s) of a batch failed to decode on %s and on the CPU; each trains as a copy of "
                    "another sample of the batch", len(bad), device)


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """The JPEGs as [3, H, W] uint8 images on ``device``, all in one call; one by one if that call fails, on the
    CPU for those the device refuses; None for those no decoder takes."""
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    images: list[Optional[torch.Tensor]] = []
    for data in encoded:
        image = None
        for on in (device, torch.device("cpu")):
            try:
                image = decode_jpeg(data, mode=ImageReadMode.RGB, device=on).to(device)
                break
            except RuntimeError:
                continue
        images.append(image)
    return images


def resized_crops(images: Sequence[torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's crop (top, left, height, width, flip) resized to ``size`` x ``size``, uint8 [N, 3, size, size]:
    torch's uint8 antialiased bilinear resize (``resize_uint8``, what the CPU path runs), pixel for pixel, for all
    the images in two batched matrix products instead of a resize call each.

    torch's uint8 path resizes the rows, rounds to uint8, then resizes the columns, with 16-bit fixed-point weights
    (``_compute_index_ranges_int16_weights``). Here the same integers are multiplied in float32 (not TF32), with
    zero weights over the padding: exact while a sum stays below 2**24, which holds for crops under three times
    ``size`` (a train crop of an image the GPU takes at 224 px); a larger one may be one grey level off."""
    n = len(images)
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    padded = images[0].new_zeros((n, 3, height, width), dtype=torch.float32)
    for i, image in enumerate(images):
        padded[i, :, :image.shape[1], :image.shape[2]] = image
    cols, col_bits = fixed_point_weights(antialias_weights(crops[:, 1], crops[:, 3], width, size))
    rows, row_bits = fixed_point_weights(antialias_weights(crops[:, 0], crops[:, 2], height, size))
    with _ieee_fp32_matmul():
        across = _round_shift(padded @ cols.unsqueeze(1).transpose(-1, -2), col_bits)  # [N, 3, height, size]
        out = _round_shift(rows.unsqueeze(1) @ across, row_bits).to(torch.uint8)  # [N, 3, size, size]
    return torch.where(crops[:, 4].bool()[:, None, None, None], out.flip(-1), out)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """float32 products at full precision even where a run allowed TF32 (whose 10-bit mantissa would round the
    weights)."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def _round_shift(sums: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """torch's fixed-point rounding: (sum + 2**(bits - 1)) >> bits, clipped to 0-255."""
    scale = torch.exp2(bits.to(sums.dtype))[:, None, None, None]
    return torch.floor((sums + scale / 2) / scale).clamp_(0, 255)


def antialias_weights(start: torch.Tensor, length: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """[N, size, axis] float64: row o holds the weights of output pixel o over the whole axis for resizing each
    window [start, start + length) to ``size`` pixels, as torch's antialiased bilinear resize computes them
    (``_compute_weights_aa``: a triangle of half-width max(scale, 1) around each output centre, cut at the
    window's edges, normalised); zero outside the window."""
    scale = length.double() / size
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))[:, None, None]
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))[:, None, None]
    centre = scale[:, None, None] * (torch.arange(size, device=scale.device, dtype=torch.float64)[None, :, None]
                                     + 0.5)
    first = (centre - support + 0.5).trunc().clamp(min=0)  # torch's int64 casts truncate
    stop = torch.minimum((centre + support + 0.5).trunc(), length.double()[:, None, None])
    j = torch.arange(axis, device=scale.device, dtype=torch.float64)[None, None, :] - start.double()[:, None, None]
    weights = (1 - ((j - centre + 0.5) * inverse).abs()).clamp(min=0) * ((j >= first) & (j < stop))
    return weights / weights.sum(-1, keepdim=True)


def fixed_point_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's weights as torch's uint8 path stores them: integers w * 2**bits rounded half away from zero,
    ``bits`` the most (below 22) that keeps twice the largest weight under 2**15; float32 (exact) and the bits."""
    largest = weights.flatten(1).amax(1)
    bits = torch.arange(22, device=weights.device, dtype=torch.float64)
    overflow = torch.floor(0.5 + largest[:, None] * torch.exp2(bits + 1)) >= 2 ** 15
    chosen = torch.where(overflow.any(1), overflow.int().argmax(1), 22)
    return torch.floor(0.5 + weights * torch.exp2(chosen.double())[:, None, None]).float(), chosen
