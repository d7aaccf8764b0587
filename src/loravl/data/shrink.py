"""A copy of an image dataset with every image shrunk to the size training decodes, for hosts whose cores cannot
decode full-size photos as fast as the GPU trains on them (decoding is most of a loader worker's time).

    python src/shrink_images.py data/coco data/coco_317 --config configs/stage1.yaml

Every file under the source folder is written to the same relative path under the destination:

- an image whose short side is over ``short_side`` is decoded as the loader decodes it (EXIF orientation applied,
  any mode to RGB, transparency on white), resized (Lanczos) to that short side and written in the format its name
  says: JPEG at ``quality``, chroma 4:2:0 as img2dataset and most prepared datasets store it, or 4:4:4 with
  ``chroma_444`` (closer to the original, larger, and slower to decode);
- an image no larger, a GIF (a palette would change its colours), a file the loader would skip (it still skips
  and counts it), and every other file (annotations, manifests) are copied byte for byte, so annotations and manifests work unchanged from the copy;
- a webdataset shard (``.tar``) is rewritten member by member, in order, by the same rules.

``shrink_target`` gives the short side a run needs, the loader's own decode target: a train crop keeps at least
``data.crop_scale_min`` of the area and is resized to ``model.vision.image_size``, so below it the crop would be
enlarged. Each output is written under a temporary name and renamed, so an interrupted run leaves whole files;
run again, it keeps the outputs already there that are newer than their source.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from loravl.config import ConfigError, DataConfig, RunConfig, load_config, split_config_arg
from loravl.data.formats import IMAGE_EXTENSIONS
from loravl.data.images import decode_target_size, load_rgb_image
from loravl.data.loader import usable_cores
from loravl.data import skips
from loravl.data.skips import Skip

SHRUNK = "shrunk"
SMALL_ENOUGH = "small enough, copied"
OTHER_FILE = "not an image, copied"
ALREADY_THERE = "already there, kept"
GIF = "GIF, copied"
_IMAGE_SUFFIXES = frozenset(f".{ext}" for ext in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ShrinkSettings:
    short_side: int
    quality: int = 95
    chroma_444: bool = False
    max_pixels: int = DataConfig.max_image_pixels


@dataclass
class ShrinkReport:
    """What happened to each file (tar members counted one by one): ``SHRUNK``, ``SMALL_ENOUGH``, ``GIF``,
    ``OTHER_FILE``, ``ALREADY_THERE``, or the loader's skip reason for a file it cannot use (copied as is)."""

    outcomes: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def add(self, other: "ShrinkReport") -> None:
        self.outcomes.update(other.outcomes)
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out

    def summary(self) -> str:
        parts = ", ".join(f"{n} {what}" for what, n in sorted(self.outcomes.items(), key=lambda kv: -kv[1]))
        return (f"{sum(self.outcomes.values())} files in {self.seconds:.1f}s: {parts}; "
                f"{self.bytes_in / 1e6:.1f} MB -> {self.bytes_out / 1e6:.1f} MB")


def shrink_target(cfg: RunConfig) -> int:
    """The short side a run's train crops need: what the loader decodes a JPEG down to (``decode_target_size``)."""
    return decode_target_size(cfg.model.vision.image_size, True, cfg.data.crop_scale_min)


def shrink_image(data: bytes, suffix: str, settings: ShrinkSettings) -> tuple[Optional[bytes], str]:
    """``(encoded, SHRUNK)`` for an image over ``settings.short_side`` on its short side; ``(None, outcome)``
    where the file is to be copied as it is (small enough, or the loader's reason to skip it)."""
    try:  # the stored size from the header alone; a file PIL cannot open gets the loader's reason below
        with Image.open(io.BytesIO(data)) as header:
            if header.format == "GIF":  # written again, its palette would change the colours
                return None, GIF
            if min(header.size) <= settings.short_side:
                return None, SMALL_ENOUGH
    except Exception:  # noqa: BLE001 - whatever PIL raises, load_rgb_image names it
        pass
    # A JPEG twice the short side or more is decoded at a reduced scale (draft) no smaller than it.
    image = load_rgb_image(data, max_pixels=settings.max_pixels, min_size=1, target_size=settings.short_side)
    if isinstance(image, Skip):
        return None, image.reason
    width, height = image.size
    scale = settings.short_side / min(width, height)
    size = (max(settings.short_side, round(width * scale)), max(settings.short_side, round(height * scale)))
    small = image.resize(size, Image.Resampling.LANCZOS)
    fmt = Image.registered_extensions().get(suffix.lower(), "PNG")
    options: dict = {}
    if fmt == "JPEG":
        options = {"quality": settings.quality, "subsampling": 0 if settings.chroma_444 else 2}
    elif fmt == "WEBP":
        options = {"quality": settings.quality}
    out = io.BytesIO()
    small.save(out, fmt, **options)
    return out.getvalue(), SHRUNK


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shrink_file(job: tuple[Path, Path, ShrinkSettings]) -> ShrinkReport:
    source, target, settings = job
    report = ShrinkReport()
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:  # written by an earlier run
        report.outcomes[ALREADY_THERE] += 1
        return report
    report.bytes_in = source.stat().st_size
    if source.suffix.lower() == ".tar":
        return _shrink_tar(source, target, settings, report)
    if source.suffix.lower() not in _IMAGE_SUFFIXES:
        _write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
        report.outcomes[OTHER_FILE] += 1
        report.bytes_out = report.bytes_in
        return report
    encoded, outcome = shrink_image(source.read_bytes(), source.suffix, settings)
    if encoded is None:
        _write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
        report.bytes_out = report.bytes_in
    else:
        _write_atomically(target, lambda tmp: tmp.write_bytes(encoded))
        report.bytes_out = len(encoded)
    report.outcomes[outcome] += 1
    return report


def _shrink_tar(source: Path, target: Path, settings: ShrinkSettings, report: ShrinkReport) -> ShrinkReport:
    """A webdataset shard rewritten member by member, in order; an unreadable shard is copied as it is (the
    loader counts it as ``unreadable_shard``)."""
    def write(tmp: Path) -> None:
        with tarfile.open(source) as shard, tarfile.open(tmp, "w") as out:
            for member in shard:
                data = shard.extractfile(member).read() if member.isfile() else None
                suffix = Path(member.name).suffix
                if data is not None and suffix.lower() in _IMAGE_SUFFIXES:
                    encoded, outcome = shrink_image(data, suffix, settings)
                    if encoded is not None:
                        data = encoded
                        member.size = len(encoded)
                else:
                    outcome = OTHER_FILE
                report.outcomes[outcome] += 1
                out.addfile(member, io.BytesIO(data) if data is not None else None)

    try:
        _write_atomically(target, write)
    except (tarfile.TarError, OSError, EOFError):
        report.outcomes.clear()
        report.outcomes[skips.UNREADABLE_SHARD] += 1
        _write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
    report.bytes_out = target.stat().st_size
    return report


def check_arguments(source: str | os.PathLike, target: str | os.PathLike,
                    settings: ShrinkSettings) -> tuple[Path, Path]:
    """The two folders, resolved; ``ConfigError`` naming what is wrong."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if not source.is_dir():
        raise ConfigError(f"{source}: not a folder")
    if target == source or source in target.parents:
        raise ConfigError(f"{target}: the copy must not be inside the source folder {source}")
    if settings.short_side < 1:
        raise ConfigError(f"short_side must be >= 1, got {settings.short_side}")
    if not 1 <= settings.quality <= 100:
        raise ConfigError(f"quality must be in [1, 100], got {settings.quality}")
    return source, target


def shrink_tree(source: str | os.PathLike, target: str | os.PathLike, settings: ShrinkSettings, *,
                workers: Optional[int] = None, progress=None) -> ShrinkReport:
    """Write the shrunk copy of the folder ``source`` to ``target`` (see the module's docstring), with
    ``workers`` processes (default: every core this process may use; 0: in this process). ``progress(done,
    total)`` is called as files finish."""
    source, target = check_arguments(source, target, settings)
    started = time.perf_counter()
    jobs = [(path, target / path.relative_to(source), settings) for path in sorted(source.rglob("*"))
            if path.is_file()]
    report = ShrinkReport()
    workers = usable_cores() if workers is None else workers
    if workers == 0:
        results = map(_shrink_file, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_shrink_file, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
    try:
        for done, result in enumerate(results, start=1):
            report.add(result)
            if progress is not None:
                progress(done, len(jobs))
    finally:
        if workers:
            pool.shutdown(cancel_futures=True)
    report.seconds = time.perf_counter() - started
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the dataset folder (images, annotations, manifests, shards)")
    parser.add_argument("target", help="the folder the shrunk copy is written to (created)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--config", help="a run config: the short side its train crops need (shrink_target)")
    size.add_argument("--short_side", type=int, help="the short side, in pixels, of every shrunk image")
    parser.add_argument("--quality", type=int, default=95, help="JPEG and WebP quality (default 95)")
    parser.add_argument("--chroma_444", action="store_true",
                        help="JPEG chroma at full resolution (default 4:2:0): closer to the original, larger files")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every core; 0: none)")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.config is not None:
            config_path, rest = split_config_arg(["--config", args.config, *overrides])
            cfg = load_config(config_path, rest)
            short_side, max_pixels = shrink_target(cfg), cfg.data.max_image_pixels
        elif overrides:
            raise ConfigError(f"unexpected arguments {' '.join(overrides)} (config overrides need --config)")
        else:
            short_side, max_pixels = args.short_side, DataConfig.max_image_pixels
        settings = ShrinkSettings(short_side, args.quality, args.chroma_444, max_pixels)
        check_arguments(args.source, args.target, settings)
        print(f"shrinking the images of {args.source} to a short side of {short_side} px into {args.target}",
              flush=True)

        def progress(done: int, total: int) -> None:
            if done % 5000 == 0 or done == total:
                print(f"{done}/{total} files", flush=True)

        report = shrink_tree(args.source, args.target, settings, workers=args.workers, progress=progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    return 0
