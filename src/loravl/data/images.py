"""Decoding any image file into 3-channel RGB, and the transforms that match the vision encoder.

``load_rgb_image`` never raises on a bad file: it returns a ``Skip`` with the reason instead.
"""
from __future__ import annotations

import io
import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from loravl.data import skips
from loravl.data.skips import Skip

# DINOv2 was trained with ImageNet normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = Union[str, os.PathLike, bytes]

_WHITE = (255, 255, 255)


def build_transform(image_size: int, train: bool, *, crop_scale: tuple[float, float] = (0.5, 1.0),
                    hflip: bool = False) -> Callable[..., torch.Tensor]:
    """PIL RGB image or uint8 tensor -> uint8 RGB tensor [3, image_size, image_size], 0-255, channels-last in memory.

    train: RandomResizedCrop (area fraction in ``crop_scale``), no flip unless asked (flips break "left of"); it
    draws from the ``random.Random`` it is given, ``transform(image, rng)``. eval: resize the short side, centre
    crop. The vision encoder normalises on the device (``loravl.vision.normalize_pixels``, any memory layout): a
    uint8 batch is a quarter of the bytes to collate, pin and copy.
    """
    if train:
        return RandomResizedCropUint8(image_size, crop_scale, hflip=hflip)
    return ResizeCenterCropUint8(image_size)


def channels_last(pixels: torch.Tensor) -> torch.Tensor:
    """A [3, H, W] image whose memory is [H, W, 3], as decoded: what the resize's vectorised uint8 path reads and
    writes without repacking, and what the collator stacks with plain copies."""
    return _hwc(pixels).permute(2, 0, 1)


def _hwc(pixels: torch.Tensor) -> torch.Tensor:
    hwc = pixels.permute(1, 2, 0)
    return hwc if hwc.is_contiguous() else hwc.contiguous()


def resize_uint8(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 [3, h, w] image (a crop view is fine), channels-last out.

    For a crop's view torch's uint8 path picks a channels-first output, which it writes pixel by pixel; on a
    channels-last copy of the crop it runs as is, faster even with the copy."""
    batch = _hwc(pixels).unsqueeze(0).permute(0, 3, 1, 2)  # [1, 3, h, w], channels-last with a whole-image stride
    return torch.nn.functional.interpolate(batch, size=size, mode="bilinear", align_corners=False,
                                           antialias=True)[0]


class RandomResizedCropUint8:
    """The train transform: torchvision's RandomResizedCrop (the same sampling of area and aspect ratio as
    ``RandomResizedCrop.get_params``, then the same antialiased bilinear resize) on a uint8 image, and a
    horizontal flip if asked. It draws from the ``random.Random`` passed in (the sample's own, seeded by
    (seed, epoch, key)), so no torch RNG state is read, forked or seeded per sample."""

    def __init__(self, size: int, scale: tuple[float, float], *, hflip: bool = False,
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self._log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_params(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width): ``RandomResizedCrop.get_params``'s algorithm, drawn from ``rng``."""
        area = height * width
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect_ratio = math.exp(rng.uniform(*self._log_ratio))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # Fallback to a central crop, as torchvision does.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Union[Image.Image, torch.Tensor], rng: Optional[random.Random] = None) -> torch.Tensor:
        rng = rng if rng is not None else random.Random()
        pixels = uint8_pixels(image)
        top, left, height, width = self.crop_params(pixels.shape[1], pixels.shape[2], rng)
        out = resize_uint8(pixels[:, top:top + height, left:left + width], (self.size, self.size))
        if self.hflip and rng.random() < 0.5:
            out = out.flip(-1)
        return out


class ResizeCenterCropUint8:
    """The eval transform: resize the short side to ``size`` (antialiased bilinear), centre crop; channels-last
    out. The same pixels as torchvision's ``Resize(size, antialias=True)`` and ``CenterCrop(size)`` (tested)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Union[Image.Image, torch.Tensor], rng: Optional[random.Random] = None) -> torch.Tensor:
        """``rng`` is not used: the train transform's signature."""
        pixels = uint8_pixels(image)
        height, width = pixels.shape[1], pixels.shape[2]
        # torchvision's Resize(int): the short side to size, the long side scaled and truncated
        if height <= width:
            new_height, new_width = self.size, int(self.size * width / height)
        else:
            new_height, new_width = int(self.size * height / width), self.size
        if (new_height, new_width) != (height, width):
            pixels = resize_uint8(pixels, (new_height, new_width))
        top = int(round((new_height - self.size) / 2.0))
        left = int(round((new_width - self.size) / 2.0))
        return channels_last(pixels[:, top:top + self.size, left:left + self.size])


def uint8_pixels(image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor [3, H, W] (a channels-last view of one copy); a tensor as it is."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def decode_target_size(image_size: int, train: bool, crop_scale_min: float) -> int:
    """The smallest side a decoded image needs so the transform never upsamples (a train crop may keep only
    ``crop_scale_min`` of the area)."""
    return math.ceil(image_size / math.sqrt(crop_scale_min)) if train else image_size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (not black, which would invent dark shapes)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit and float images: PIL's convert("RGB") clips to 255 instead of rescaling.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            peak = 1.0
        array = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_jpeg_rgb(data: Union[bytes, bytearray, memoryview]) -> Optional[torch.Tensor]:
    """A JPEG as an upright uint8 RGB tensor [3, H, W] (torchvision, EXIF orientation applied); None where
    libjpeg-turbo refuses it (a damaged file: PIL then decodes what it can or says why not)."""
    # decode_jpeg takes a tensor over the bytes; a writable copy (bytes are read-only), a few us against ~1 ms
    encoded = data if isinstance(data, bytearray) else bytearray(data)
    try:
        return decode_jpeg(torch.frombuffer(encoded, dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)
    except RuntimeError:
        return None


# Start-of-frame markers of the Huffman-coded JPEGs libjpeg-turbo decodes: baseline, extended, progressive.
_HUFFMAN_SOF_MARKERS = (0xC0, 0xC1, 0xC2)
_ALL_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # 0xC4/0xCC: tables, 0xC8: reserved


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int
    marker: int  # which start-of-frame: 0xC0 baseline, 0xC2 progressive, ...
    precision: int  # bits a sample


def jpeg_frame(data: Union[bytes, bytearray, memoryview]) -> Optional[JpegFrame]:
    """A JPEG's frame header (size, components, coding) from its first bytes, or None where ``data`` is no JPEG
    or its header is cut or odd. Reads the few marker segments before the frame header, nothing else: a fraction
    of the work of PIL's ``Image.open``, which the loader's workers otherwise do for every JPEG."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _ALL_SOF_MARKERS:
            if length < 8 or pos + 10 > end:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return JpegFrame(width, height, data[pos + 9], marker, data[pos + 4])
        if length < 2:
            return None
        pos += 2 + length
    return None


def _plain_jpeg_pixels(data: Union[bytes, bytearray, memoryview], *, max_pixels: int, min_size: int,
                       target_size: Optional[int]) -> Union[torch.Tensor, Skip, None]:
    """The loader's fast path: an 8-bit grey or colour JPEG checked from its frame header and decoded by
    torchvision, with no PIL. None hands the file to the PIL path: not such a JPEG, one to decode at a reduced
    scale (``target_size``), or one libjpeg-turbo refuses (PIL then says why)."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    width, height = frame.width, frame.height
    if (frame.marker not in _HUFFMAN_SOF_MARKERS or frame.components not in (1, 3) or frame.precision != 8
            or height == 0):  # height 0: given later in the scan (DNL), which PIL handles
        return None
    if width * height > max_pixels or (Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS):
        return Skip(skips.DECOMPRESSION_BOMB, f"{width}x{height}")  # what PIL's check says on the same header
    if width < min_size or height < min_size:
        return Skip(skips.TOO_SMALL, f"{width}x{height}")
    if target_size and min(width, height) >= 2 * target_size:
        return None
    return decode_jpeg_rgb(data)


def load_rgb_image(source: ImageSource, *, max_pixels: int, min_size: int, target_size: Optional[int] = None,
                   as_tensor: bool = False) -> Union[Image.Image, torch.Tensor, Skip]:
    """Open a path or bytes as an upright RGB image, or return ``Skip(reason)``.

    ``target_size``: when a JPEG is much larger, decode it at a reduced scale (PIL ``draft``) whose sides are still
    >= target_size. ``max_pixels`` is checked per image from the header, so the global ``Image.MAX_IMAGE_PIXELS``
    that other code relies on stays untouched.

    ``as_tensor``: return a uint8 tensor [3, H, W] (channels-last memory) instead of a PIL image, what the
    transforms take. An 8-bit JPEG in colour or grey decoded at full scale is then checked from its frame header
    (``jpeg_frame``) and decoded by torchvision's libjpeg-turbo (``decode_jpeg``) straight into the tensor, with
    no PIL: the same pixels and the same skips as the PIL path, in less time (decoding is most of a data-loader
    worker's time). Any other file, or a JPEG libjpeg-turbo refuses, takes the PIL path.
    """
    try:
        data: Optional[Union[bytes, bytearray, memoryview]] = None  # the encoded file, for decode_jpeg_rgb
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                return Skip(skips.EMPTY_FILE)
            data = source if as_tensor else None
            stream: Union[io.BytesIO, Path] = io.BytesIO(source)
        elif as_tensor:  # read once: the header is parsed from these bytes, torchvision decodes them
            try:  # one open, no separate checks first: pathlib's were about 3% of a worker's time (py-spy)
                with open(source, "rb") as file:
                    data = file.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return Skip(skips.MISSING_FILE, os.fspath(source))
            if not data:
                return Skip(skips.EMPTY_FILE, os.fspath(source))
            stream = io.BytesIO(data)
        else:
            path = Path(source)
            if not path.is_file():
                return Skip(skips.MISSING_FILE, str(path))
            if path.stat().st_size == 0:
                return Skip(skips.EMPTY_FILE, str(path))
            stream = path
        if data is not None:
            fast = _plain_jpeg_pixels(data, max_pixels=max_pixels, min_size=min_size, target_size=target_size)
            if fast is not None:
                return fast
        with warnings.catch_warnings():
            # PIL warns (then errors) on huge images against its global limit; treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return Skip(skips.DECOMPRESSION_BOMB, f"{width}x{height}")
                if width < min_size or height < min_size:
                    return Skip(skips.TOO_SMALL, f"{width}x{height}")
                if target_size and image.format == "JPEG" and min(width, height) >= 2 * target_size:
                    image.draft("RGB", (target_size, target_size))
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright image
                rgb = to_rgb(image)
                return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1) if as_tensor else rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Skip(skips.DECOMPRESSION_BOMB, str(e))
    except UnidentifiedImageError as e:
        return Skip(skips.NOT_AN_IMAGE, str(e))
    except FileNotFoundError as e:
        return Skip(skips.MISSING_FILE, str(e))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated or damaged data: PIL raises OSError("image file is truncated"), SyntaxError (broken PNG
        # chunks), ValueError or EOFError depending on the codec.
        return Skip(skips.CORRUPT_IMAGE, str(e))
    except Exception as e:  # noqa: BLE001 - a plugin bug on one odd file must not stop a run
        return Skip(skips.READ_ERROR, f"{type(e).__name__}: {e}")
