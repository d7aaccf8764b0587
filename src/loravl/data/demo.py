"""The built-in demo set: synthetic scenes of two coloured shapes and a caption that says where they are.

The caption is a function of the picture alone: the two objects always differ, the one named first is the one
earlier in (COLOURS, SHAPES) order, and the relation comes from where they are drawn (clearly apart along one
axis, nearly aligned along the other). So a model can reach exact-match captions on the val split.

Stored as a JSONL manifest per split and read through the ordinary ``jsonl`` loader, in a folder under ``root``
named by the settings: ``<set>/train/captions.jsonl``, ``<set>/train/images/000000.png``, ... and ``<set>/val``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Union

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND = (255, 255, 255)

_MARKER = "demo.json"
_FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


def demo_caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """("red", "circle"), "left of", ("blue", "square") -> "a red circle left of a blue square"."""
    return f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"


# Each relation as "the A is ... the B" says it, and the relation that holds the other way round.
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def demo_captions(first: tuple[str, str], relation: str, second: tuple[str, str], count: int) -> list[str]:
    """The scene's canonical caption (``demo_caption``) and up to four paraphrases, ``count`` in all, in this order:
    the objects swapped, "there is ...", "the A is ... the B", "the B is ... the A"."""
    a, b = f"{first[0]} {first[1]}", f"{second[0]} {second[1]}"
    inverse = INVERSE[relation]
    captions = [demo_caption(first, relation, second), f"a {b} {inverse} a {a}",
                f"there is a {a} {relation} a {b}", f"the {a} is {RELATION_PHRASES[relation]} the {b}",
                f"the {b} is {RELATION_PHRASES[inverse]} the {a}"]
    return captions[:count]


def _object_order(obj: tuple[str, str]) -> tuple[int, int]:
    return list(COLOURS).index(obj[0]), SHAPES.index(obj[1])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], half: float,
                colour: tuple[int, int, int]) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=colour)
    elif shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
    else:
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)


def render_scene(rng: random.Random, image_size: int, captions: int = 1) -> tuple[Image.Image, list[str]]:
    """Draw one random scene; returns the image and ``captions`` captions of it (``demo_captions``)."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    first, second = sorted(rng.sample(objects, 2), key=_object_order)
    relation = rng.choice(RELATIONS)
    size = image_size
    half = size * rng.uniform(0.09, 0.12)
    # Along the relation's axis the shapes sit in opposite thirds; across it they stay within 0.08*size.
    near, far = rng.uniform(0.2, 0.3) * size, rng.uniform(0.7, 0.8) * size
    across = rng.uniform(0.4, 0.6) * size
    jitter = rng.uniform(-0.08, 0.08) * size
    if relation in ("left of", "above"):
        first_along, second_along = near, far
    else:
        first_along, second_along = far, near
    if relation in ("left of", "right of"):
        first_centre, second_centre = (first_along, across), (second_along, across + jitter)
    else:
        first_centre, second_centre = (across, first_along), (across + jitter, second_along)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _draw_shape(draw, first[1], first_centre, half, COLOURS[first[0]])
    _draw_shape(draw, second[1], second_centre, half, COLOURS[second[0]])
    return image, demo_captions(first, relation, second, captions)


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def ensure_demo_data(root: Union[str, os.PathLike], train_size: int = 2000, val_size: int = 200,
                     image_size: int = 64, seed: int = 0, captions_per_image: int = 1) -> Path:
    """The demo set with these settings: a folder under ``root`` named by them, generated unless complete.

    Runs that ask for other sizes get folders of their own, so one never regenerates the set another run is
    reading. Deterministic in (seed, split, index). Written to a temporary folder and renamed into place, so
    several ranks calling this at once end with one complete copy.
    """
    root = Path(root)
    params = {"version": _FORMAT_VERSION, "train_size": train_size, "val_size": val_size,
              "image_size": image_size, "seed": seed}
    folder = root / f"train{train_size}_val{val_size}_{image_size}px_seed{seed}"
    if captions_per_image > 1:  # (one caption: the folders and markers of earlier releases stay valid)
        params["captions_per_image"] = captions_per_image
        folder = folder.with_name(folder.name + f"_captions{captions_per_image}")
    if _is_complete(folder, params):
        return folder
    logger.info("Generating the demo set (%d training and %d validation scenes, %d px) into %s", train_size,
                val_size, image_size, folder)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for split, count in (("train", train_size), ("val", val_size)):
        (staging / split / "images").mkdir(parents=True)
        with open(staging / split / "captions.jsonl", "w", encoding="utf-8") as manifest:
            for index in range(count):
                rng = random.Random(f"loravl-demo-{seed}-{split}-{index}")
                image, captions = render_scene(rng, image_size, captions_per_image)
                relative = f"images/{index:06d}.png"
                image.save(staging / split / relative)
                for caption in captions:  # the jsonl reader gathers the rows of one image into its captions
                    manifest.write(json.dumps({"image": relative, "caption": caption}) + "\n")
    (staging / _MARKER).write_text(json.dumps(params))
    if _is_complete(folder, params):  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete copy left by a crash
    try:
        os.rename(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(folder, params):
            raise
    return folder


