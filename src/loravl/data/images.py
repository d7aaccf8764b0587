"""Decoding any image file into 3-channel RGB, and the transforms that match the vision encoder.

``load_rgb_image`` never raises on a bad file: it returns a ``Skip`` with the reason instead.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from loravl.data import skips
from loravl.data.skips import Skip

# DINOv2 was trained with ImageNet normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = Union[str, os.PathLike, bytes]

_WHITE = (255, 255, 255)


def build_transform(image_size: int, train: bool, *, crop_scale: tuple[float, float] = (0.5, 1.0),
                    hflip: bool = False) -> v2.Compose:
    """PIL RGB image -> uint8 RGB tensor [3, image_size, image_size], 0-255.

    train: RandomResizedCrop (area fraction in ``crop_scale``), no flip unless asked (flips break "left of");
    eval: resize the short side, centre crop. The vision encoder normalises on the device
    (``loravl.vision.normalize_pixels``): a uint8 batch is a quarter of the bytes to collate, pin and copy.
    """
    # Crop and resize run on the uint8 tensor in channels-last memory, torch's vectorised antialiased bilinear
    # path: on a 640x480 photo 0.46 ms against Pillow's 1.25 ms (2-core dev box), within one grey level of it.
    steps: list = [ToUint8Tensor()]
    if train:
        steps.append(v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    steps.append(Contiguous())
    return v2.Compose(steps)


class ToUint8Tensor:
    """RGB PIL image -> uint8 image tensor [3, H, W], a channels-last view of one copy of the pixels. A uint8
    tensor (``load_rgb_image(..., as_tensor=True)``) passes as it is."""

    def __call__(self, image: Union[Image.Image, torch.Tensor]) -> tv_tensors.Image:
        if isinstance(image, torch.Tensor):
            return tv_tensors.Image(image)
        return tv_tensors.Image(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))


class Contiguous:
    """The transform's output as a plain contiguous tensor (a centre crop is a view of the resized image)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.as_subclass(torch.Tensor).contiguous()


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


def load_rgb_image(source: ImageSource, *, max_pixels: int, min_size: int, target_size: Optional[int] = None,
                   as_tensor: bool = False) -> Union[Image.Image, torch.Tensor, Skip]:
    """Open a path or bytes as an upright RGB image, or return ``Skip(reason)``.

    ``target_size``: when a JPEG is much larger, decode it at a reduced scale (PIL ``draft``) whose sides are still
    >= target_size. ``max_pixels`` is checked per image from the header, so the global ``Image.MAX_IMAGE_PIXELS``
    that other code relies on stays untouched.

    ``as_tensor``: return a uint8 tensor [3, H, W] (channels-last memory) instead of a PIL image, what the
    transforms take. A JPEG in RGB or grey decoded at full scale then goes through torchvision's libjpeg-turbo
    (``decode_jpeg``) straight into the tensor: the same pixels as PIL's, a third less time (1.0 against 1.4 ms
    for a 640x480 photo on the 2-core dev box; decoding is most of a data-loader worker's time).
    """
    try:
        data: Optional[Union[bytes, bytearray, memoryview]] = None  # the encoded file, for decode_jpeg_rgb
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                return Skip(skips.EMPTY_FILE)
            data = source if as_tensor else None
            stream: Union[io.BytesIO, Path] = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                return Skip(skips.MISSING_FILE, str(path))
            if path.stat().st_size == 0:
                return Skip(skips.EMPTY_FILE, str(path))
            stream = path
            if as_tensor:  # read once: PIL parses the header from these bytes, torchvision decodes them
                data = path.read_bytes()
                stream = io.BytesIO(data)
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
                elif data is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
                    pixels = decode_jpeg_rgb(data)
                    if pixels is not None:
                        return pixels
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
