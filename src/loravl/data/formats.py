"""Reading every supported data format into one contract: an image (path or bytes), its captions, an image id.

Map-style formats (coco, karpathy, jsonl, csv, demo, hf) give a ``RecordTable``: ``len`` and ``record(i)``.
Streaming formats (webdataset, hf with streaming) give a ``ShardSource``: a list of shards and
``iter_shard(i, skip)`` that yields raw records from shard ``i`` after skipping ``skip`` of them (cheaply: no
decoding), which is what exact resume needs.

Problems found at start (missing file, missing column, bad JSON) raise ``DataFormatError`` naming the path/field.
"""
from __future__ import annotations

import csv
import itertools
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

from loravl.config import ConfigError, DataConfig
from loravl.data import skips
from loravl.data.skips import Skip

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class DataFormatError(ConfigError):
    """The data cannot be read at all (wrong path, missing column, malformed annotation file)."""


@dataclass(frozen=True)
class RawRecord:
    """One image before decoding. ``image`` is a path or the encoded bytes; ``captions`` are raw strings."""

    image: Union[str, bytes, None]
    captions: tuple[str, ...]
    image_id: int


class RecordTable(Protocol):
    def __len__(self) -> int: ...

    def record(self, index: int) -> Union[RawRecord, Skip]: ...


class ShardSource(Protocol):
    shards: Sequence[str]

    def iter_shard(self, shard_index: int, skip: int) -> Iterator[Union[RawRecord, Skip]]: ...


def clean_captions(raw: Any) -> tuple[str, ...]:
    """A caption or a list of captions -> non-empty, whitespace-normalised strings (possibly none)."""
    if raw is None:
        return ()
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        if not isinstance(item, str):
            continue
        text = " ".join(item.split())
        if text:
            out.append(text)
    return tuple(out)


# Map-style: grouped records in memory


@dataclass
class ListRecordTable:
    """Unique images with all their captions; ids are given by the format (COCO) or by first appearance."""

    images: list[str]
    captions: list[tuple[str, ...]]
    image_ids: list[int]

    def __len__(self) -> int:
        return len(self.images)

    def record(self, index: int) -> RawRecord:
        return RawRecord(self.images[index], self.captions[index], self.image_ids[index])


def _group_by_image(rows: list[tuple[str, Any]], root: Path) -> ListRecordTable:
    """(relative image path, caption or caption list) rows -> one record per distinct image, in first-seen order,
    with dense ids 0..n-1: every rank reads the same file, so ids agree across ranks."""
    order: dict[str, int] = {}
    captions: list[list[str]] = []
    for image, caption in rows:
        key = str(image)
        if key not in order:
            order[key] = len(captions)
            captions.append([])
        captions[order[key]].extend(clean_captions(caption))
    images = [str(root / key) for key in order]
    return ListRecordTable(images, [tuple(c) for c in captions], list(range(len(images))))


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{what} not found: {path}")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataFormatError(f"{what} not found: {path}")
    return path


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}") from None


def default_coco_image_root(annotation_file: Path) -> Path:
    """COCO layout: ``<root>/annotations/captions_train2017.json`` with images in ``<root>/train2017/``.

    Falls back to the annotation file's folder when that image folder does not exist.
    """
    match = re.match(r"captions_(.+)\.json$", annotation_file.name)
    if match and annotation_file.parent.name == "annotations":
        candidate = annotation_file.parent.parent / match.group(1)
        if candidate.is_dir():
            return candidate
    return annotation_file.parent


def read_coco(annotation_file: Path, image_root: Optional[Path]) -> ListRecordTable:
    """COCO captions JSON: ``images`` [{id, file_name}], ``annotations`` [{image_id, caption}]. Keeps COCO's ids."""
    data = _load_json(_require_file(annotation_file, "COCO annotation file"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataFormatError(f"{annotation_file}: a COCO captions file needs 'images' and 'annotations' lists")
    root = _require_dir(image_root or default_coco_image_root(annotation_file), "COCO image folder")
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise DataFormatError(f"{annotation_file}: annotations[{i}] lacks 'image_id' or 'caption'")
        captions.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    images, texts, ids = [], [], []
    for i, image in enumerate(data["images"]):
        if "id" not in image or "file_name" not in image:
            raise DataFormatError(f"{annotation_file}: images[{i}] lacks 'id' or 'file_name'")
        if int(image["id"]) not in captions:
            continue  # an image without captions teaches nothing
        images.append(str(root / image["file_name"]))
        texts.append(clean_captions(captions[int(image["id"])]))
        ids.append(int(image["id"]))
    return ListRecordTable(images, texts, ids)


def read_karpathy(annotation_file: Path, image_root: Optional[Path]) -> ListRecordTable:
    """ALBEF/BLIP Karpathy-split JSON: a list of {"image": relpath, "caption": str | [str], "image_id"?}."""
    data = _load_json(_require_file(annotation_file, "Karpathy annotation file"))
    if not isinstance(data, list):
        raise DataFormatError(f"{annotation_file}: a Karpathy-split file is a JSON list of entries")
    rows = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise DataFormatError(f"{annotation_file}: entry {i} lacks 'image' or 'caption'")
        rows.append((entry["image"], entry["caption"]))
    return _group_by_image(rows, _require_dir(image_root or annotation_file.parent, "image folder"))


def read_manifest(manifest: Path, image_column: str, text_column: str, image_root: Optional[Path],
                  kind: str) -> ListRecordTable:
    """JSONL or CSV rows of (image path, caption); paths are relative to the manifest's folder (or image_root)."""
    _require_file(manifest, f"{kind.upper()} manifest")
    rows: list[tuple[str, Any]] = []
    with open(manifest, encoding="utf-8", newline="") as f:
        if kind == "csv":
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for name, field in ((image_column, "image_column"), (text_column, "text_column")):
                if name not in columns:
                    raise DataFormatError(f"{manifest}: no column {name!r} (data.{field}); columns: {columns}")
            rows = [(row[image_column], row[text_column]) for row in reader]
        else:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{manifest}:{line_number}: not valid JSON: {e}") from None
                if not isinstance(row, dict):
                    raise DataFormatError(f"{manifest}:{line_number}: a JSON {type(row).__name__}, not an object "
                                          f"with fields {image_column!r} and {text_column!r}")
                for name, field in ((image_column, "image_column"), (text_column, "text_column")):
                    if name not in row:
                        raise DataFormatError(
                            f"{manifest}:{line_number}: no field {name!r} (data.{field}); fields: {sorted(row)}")
                rows.append((row[image_column], row[text_column]))
    return _group_by_image(rows, _require_dir(image_root or manifest.parent, "image folder"))


# Hugging Face datasets


def _hf_load(path: str, cfg: DataConfig, streaming: bool):
    """A local ``save_to_disk`` folder, an ``imagefolder`` with metadata.jsonl, or anything ``load_dataset`` reads."""
    import datasets

    local = Path(path)
    is_saved = local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                                   or (local / "state.json").is_file())
    try:
        if is_saved:
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.hf_split not in loaded:
                    raise DataFormatError(f"{path}: no split {cfg.hf_split!r} (data.hf_split); "
                                          f"splits: {list(loaded)}")
                loaded = loaded[cfg.hf_split]
            if streaming:
                loaded = loaded.to_iterable_dataset(num_shards=max(1, min(64, len(loaded))))
            return loaded
        return datasets.load_dataset(path, split=cfg.hf_split, streaming=streaming)
    except DataFormatError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise DataFormatError(f"cannot load Hugging Face dataset {path!r} (split {cfg.hf_split!r}): {e}") from e


def _hf_prepare(dataset, path: str, cfg: DataConfig):
    """Check the columns and turn off datasets' own image decoding: we decode, so a bad file is a skip."""
    import datasets

    columns = list(dataset.column_names or dataset.features or [])
    for name, field in ((cfg.image_column, "image_column"), (cfg.text_column, "text_column")):
        if name not in columns:
            raise DataFormatError(f"{path}: no column {name!r} (data.{field}); columns: {columns}")
    features = dataset.features
    if features is not None and isinstance(features.get(cfg.image_column), datasets.Image):
        dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    return dataset.select_columns([cfg.image_column, cfg.text_column])


def hf_image_value(value: Any) -> Union[str, bytes, None]:
    """datasets' undecoded Image value ({"bytes", "path"}), raw bytes or a path -> what load_rgb_image takes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        return value.get("path")
    if isinstance(value, (bytes, str)):
        return value
    return None


@dataclass
class HFRecordTable:
    """Map-style HF dataset: one row per image, the row index is the image id."""

    dataset: Any
    image_column: str
    text_column: str

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> RawRecord:
        row = self.dataset[index]
        return RawRecord(hf_image_value(row[self.image_column]), clean_captions(row[self.text_column]), index)


@dataclass
class HFShardSource:
    """Streaming HF dataset: its data-file shards; ids are (shard, position) packed into one int64."""

    dataset: Any
    image_column: str
    text_column: str

    @property
    def shards(self) -> list[str]:
        return [str(i) for i in range(self.dataset.num_shards)]

    def iter_shard(self, shard_index: int, skip: int) -> Iterator[Union[RawRecord, Skip]]:
        shard = self.dataset.shard(num_shards=self.dataset.num_shards, index=shard_index, contiguous=True)
        for position, row in enumerate(itertools.islice(iter(shard), skip, None), start=skip):
            yield RawRecord(hf_image_value(row[self.image_column]), clean_captions(row[self.text_column]),
                            stream_image_id(shard_index, position))


def stream_image_id(shard_index: int, position: int) -> int:
    """Unique per image in a sharded split, the same on every rank: shard in the high bits, position in the low."""
    return (shard_index << 32) | position


# WebDataset tar shards


def expand_shard_pattern(pattern: str) -> list[str]:
    """``shards/{00000..00099}.tar`` (and ``a.tar::b.tar``) -> the shard list; local shards must exist."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(pattern)
    if not urls:
        raise DataFormatError(f"shard pattern {pattern!r} names no shards")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise DataFormatError(f"{len(missing)} of {len(urls)} shards not found, first: {missing[0]} "
                              f"(pattern {pattern!r})")
    return urls


@dataclass
class WebDatasetShardSource:
    """Tar shards of samples ``<key>.jpg|png|webp`` + ``<key>.txt`` or ``<key>.json`` (caption under text_column,
    or "caption"/"text"). Read with webdataset's tar iterators; a broken shard becomes one ``unreadable_shard``
    skip instead of an exception."""

    shards: list[str]
    text_column: str = "caption"

    def _caption(self, sample: dict[str, Any]) -> tuple[str, ...]:
        if "txt" in sample:
            return clean_captions(sample["txt"])
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                return ()
            if isinstance(meta, dict):
                for key in (self.text_column, "caption", "text"):
                    if key in meta:
                        return clean_captions(meta[key])
        return ()

    def iter_shard(self, shard_index: int, skip: int) -> Iterator[Union[RawRecord, Skip]]:
        from webdataset.tariterators import tarfile_samples

        errors: list[Exception] = []

        def stop_on_error(exn: Exception) -> bool:
            errors.append(exn)
            return False

        samples = tarfile_samples([{"url": self.shards[shard_index]}], handler=stop_on_error)
        try:
            for position, sample in enumerate(itertools.islice(samples, skip, None), start=skip):
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                if image is None:
                    yield Skip(skips.NO_IMAGE, f"{sample.get('__key__')} in {self.shards[shard_index]}")
                    continue
                yield RawRecord(image, self._caption(sample), stream_image_id(shard_index, position))
        except (tarfile.TarError, OSError, ValueError) as e:
            errors.append(e)
        if errors:
            yield Skip(skips.UNREADABLE_SHARD, f"{self.shards[shard_index]}: {errors[0]}")


# Choosing the reader


def split_path(cfg: DataConfig, split: str) -> str:
    if split == "train":
        return cfg.train_path
    if split in ("val", "validation", "eval"):
        if not cfg.val_path and cfg.format != "demo":
            raise DataFormatError("data.val_path is empty: no validation data configured")
        return cfg.val_path or cfg.train_path
    raise DataFormatError(f"unknown split {split!r}: expected 'train' or 'val'")


def open_source(cfg: DataConfig, split: str) -> Union[RecordTable, ShardSource]:
    """The reader for ``cfg.format`` and ``split``. The demo is generated on first use, then read as JSONL."""
    path = split_path(cfg, split)
    image_root = Path(cfg.image_root) if cfg.image_root else None
    fmt = cfg.format
    if fmt == "demo":
        from loravl.data.demo import ensure_demo_data

        root = ensure_demo_data(cfg.train_path, train_size=cfg.demo_train_size, val_size=cfg.demo_val_size,
                                image_size=cfg.demo_image_size, seed=cfg.demo_seed,
                                captions_per_image=cfg.demo_captions_per_image)
        demo_split = "train" if split == "train" else "val"
        return read_manifest(root / demo_split / "captions.jsonl", "image", "caption", None, "jsonl")
    if fmt == "coco":
        return read_coco(Path(path), image_root)
    if fmt == "karpathy":
        return read_karpathy(Path(path), image_root)
    if fmt in ("jsonl", "csv"):
        return read_manifest(Path(path), cfg.image_column, cfg.text_column, image_root, fmt)
    if fmt == "hf":
        dataset = _hf_prepare(_hf_load(path, cfg, cfg.streaming), path, cfg)
        if cfg.streaming:
            return HFShardSource(dataset, cfg.image_column, cfg.text_column)
        return HFRecordTable(dataset, cfg.image_column, cfg.text_column)
    if fmt == "webdataset":
        return WebDatasetShardSource(expand_shard_pattern(path), cfg.text_column)
    raise DataFormatError(f"data.format {fmt!r} is not supported")


def is_streaming(source: Union[RecordTable, ShardSource]) -> bool:
    return hasattr(source, "iter_shard")

