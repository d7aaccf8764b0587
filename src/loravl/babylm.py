"""Zero-shot evaluation on the BabyLM challenge's tasks, read from the challenge's own files in a local folder:
BLiMP and its supplement, EWoK (text alone), Winoground and VQA with distractors (with images).

    python src/evaluate_babylm.py --checkpoint checkpoints/stage1/latest --data evaluation_data/full_eval \
        [--tasks blimp,blimp_supplement,ewok,winoground,vqa] [--images DIR] [--out babylm_results.json]

Candidates are ranked as the 2025 pipeline ranks them (``loravl.scoring``): BLiMP compares the two sentences,
EWoK Target1 against Target2 after Context1, VQA the answers after the question with the image. Winoground scores
each of its four image-caption pairs three ways: the ITM head, ITC similarity and the captioner's log-probability.
A row that cannot be used (not JSON, a key missing, an image missing or unreadable) is skipped and counted by
reason; the first few are named.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

from .data.skips import Skip
from .scoring import completion_logprobs, encode_completion, match_scores

if TYPE_CHECKING:
    from .model import VisionLanguageModel

# Each task's folder under --data: the names the challenge's evaluation_data uses, then plain ones.
TASK_FOLDERS = {
    "blimp": ("blimp_filtered", "blimp_fast", "blimp"),
    "blimp_supplement": ("supplement_filtered", "supplement_fast", "blimp_supplement", "supplement"),
    "ewok": ("ewok_filtered", "ewok_fast", "ewok"),
    "winoground": ("winoground_filtered", "winoground_fast", "winoground"),
    "vqa": ("vqa_filtered", "vqa_fast", "vqa"),
}
REQUIRED_KEYS = {
    "blimp": ("sentence_good", "sentence_bad"),
    "blimp_supplement": ("sentence_good", "sentence_bad"),
    "ewok": ("Context1", "Context2", "Target1", "Target2"),
    "winoground": ("caption_0", "caption_1", "image_0", "image_1"),
    "vqa": ("question", "target_ans", "distractors", "image"),
}
IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg", ".webp")
NAMED_BAD_ROWS = 5


@dataclass
class Item:
    """One row: candidates ``prefix + completions[i]``, the first one right; or Winoground's two captions and two
    images (``completions`` and ``images``)."""
    uid: str
    completions: list[str]
    prefix: str = ""
    field: Optional[str] = None
    images: list[Path] = dataclasses.field(default_factory=list)


@dataclass
class BadRows:
    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < NAMED_BAD_ROWS:
            self.examples.append(f"{where}: {reason}")


def task_folder(data: Path, task: str) -> Path:
    for name in TASK_FOLDERS[task]:
        if (data / name).is_dir():
            return data / name
    raise FileNotFoundError(f"--data {data}: no folder for {task} (looked for {', '.join(TASK_FOLDERS[task])})")


def _resolve_image(name: str, folders: Sequence[Path]) -> Optional[Path]:
    for folder in folders:
        for suffix in IMAGE_SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def _item(task: str, row: dict, stem: str, image_folders: Sequence[Path]) -> Item | str:
    """The row as an Item, or why it cannot be one."""
    missing = [k for k in REQUIRED_KEYS[task] if row.get(k) in (None, "", [])]
    if missing:
        return f"missing key {missing[0]!r}"
    if task in ("blimp", "blimp_supplement"):
        field_name = row.get("field") or "supplement"
        return Item(str(row.get("UID") or stem), [str(row["sentence_good"]), str(row["sentence_bad"])],
                    field=field_name.replace("syntax_semantics", "syntax/semantics"))
    if task == "ewok":  # the pipeline's causal pairing: both targets after Context1
        return Item(str(row.get("Domain") or stem), [f" {row['Target1']}", f" {row['Target2']}"],
                    prefix=str(row["Context1"]))
    names = [row["image_0"], row["image_1"]] if task == "winoground" else [row["image"]]
    images = [_resolve_image(str(n), image_folders) for n in names]
    if None in images:
        return f"missing image {names[images.index(None)]!r}"
    if task == "winoground":
        return Item(str(row.get("collapsed_tag") or "winoground"), [str(row["caption_0"]), str(row["caption_1"])],
                    images=images)
    if not isinstance(row["distractors"], list):
        return "'distractors' is not a list"
    return Item("vqa", [" " + str(a) for a in [row["target_ans"], *row["distractors"]]], prefix=str(row["question"]),
                images=images)


def read_task(data: Path, task: str, images: Optional[Path] = None) -> tuple[list[Item], BadRows]:
    """Every row of the task's ``*.jsonl`` files, in file-name order."""
    folder = task_folder(data, task)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .jsonl files for {task}")
    image_folders = [p for p in (images, folder / "images", folder, data / "images") if p is not None]
    items, bad = [], BadRows()
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.add("not JSON", f"{path}:{number}")
                continue
            item = _item(task, row, path.stem, image_folders) if isinstance(row, dict) else "not a JSON object"
            if isinstance(item, str):
                bad.add(item, f"{path}:{number}")
            else:
                items.append(item)
    return items, bad


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _progress(iterable, total: int, task: str):
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=task, unit="batch", leave=False)


@functools.lru_cache(maxsize=4)
def _preparer(image_size: int):
    """The captioner's image loading and eval transform, with the loader's limits on image size (made once)."""
    from .config import DataConfig
    from .generate import ImagePreparer

    limits = DataConfig()
    return ImagePreparer(image_size, limits.max_image_pixels, limits.min_image_size)


def _images(model: "VisionLanguageModel", items: Sequence[Item], bad: BadRows
            ) -> tuple[list[Item], Optional[torch.Tensor]]:
    """The items whose images all load, and their pixels stacked [items * images per item, 3, S, S]."""
    from .generate import describe_skip

    prepare = _preparer(model.cfg.vision.image_size)
    kept, pixels = [], []
    for item in items:
        loaded = [prepare(path) for path in item.images]
        failed = next(((p, s) for p, s in zip(item.images, loaded) if isinstance(s, Skip)), None)
        if failed:
            bad.add(f"unreadable image ({describe_skip(failed[1], str(failed[0]))})", str(failed[0]))
            continue
        kept.append(item)
        pixels.extend(loaded)
    device = model.temperature.device
    return kept, (torch.stack(pixels).to(device) if pixels else None)


def rank_items(model: "VisionLanguageModel", items: Sequence[Item], bad: BadRows, batch_size: int,
               with_images: bool, task: str) -> tuple[list[Item], list[bool], int]:
    """Items scored, whether each ranks its first candidate highest, and how many were cut to fit the model."""
    kept_all, correct, truncated = [], [], 0
    for batch in _progress(_batches(items, batch_size), -(-len(items) // batch_size), task):
        image_tokens = None
        if with_images:
            batch, pixels = _images(model, batch, bad)
            if not batch:
                continue
            image_tokens = model.encode_image(pixels)["image_tokens"]
        rows = [encode_completion(model, item.prefix, c) for item in batch for c in item.completions]
        truncated += sum(r.truncated for r in rows)
        owners = torch.tensor([i for i, item in enumerate(batch) for _ in item.completions])
        scores = completion_logprobs(model, rows, None if image_tokens is None
                                     else image_tokens[owners.to(image_tokens.device)]).cpu()
        start = 0
        for item in batch:
            candidates = scores[start:start + len(item.completions)]
            correct.append(bool(candidates.argmax() == 0))
            start += len(item.completions)
        kept_all.extend(batch)
    return kept_all, correct, truncated


def winoground_scores(model: "VisionLanguageModel", items: Sequence[Item], bad: BadRows, batch_size: int
                      ) -> tuple[list[Item], dict[str, list[dict[str, bool]]]]:
    """Winoground's text, image and group scores per item, for each scorer (itm, itc, lm); and the unpaired text
    score the 2025 pipeline reports (each image alone: does its caption win)."""
    kept_all, outcomes = [], defaultdict(list)
    pairs_of_item = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (image, caption)
    for batch in _progress(_batches(items, max(1, batch_size // 4)), -(-len(items) // max(1, batch_size // 4)),
                           "winoground"):
        batch, pixels = _images(model, batch, bad)
        if not batch:
            continue
        captions = [c for item in batch for c in item.completions]
        pairs = [(2 * i + im, 2 * i + ca) for i in range(len(batch)) for im, ca in pairs_of_item]
        scores = match_scores(model, pixels, captions, pairs)
        for scorer, values in scores.items():
            s = values.view(len(batch), 2, 2).cpu()  # [item, image, caption]
            for item_scores in s:
                text = [bool(item_scores[0, 0] > item_scores[0, 1]), bool(item_scores[1, 1] > item_scores[1, 0])]
                image = bool(item_scores[0, 0] > item_scores[1, 0]) and bool(item_scores[1, 1] > item_scores[0, 1])
                outcomes[scorer].append({"text": all(text), "image": image, "group": all(text) and image,
                                         "text_unpaired": sum(text) / 2})
        kept_all.extend(batch)
    return kept_all, outcomes


def _accuracy(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(items: Sequence[Item], correct: Sequence[float]) -> dict:
    """Accuracy over items, the unweighted mean over UIDs (the pipeline's task score), and each UID and field."""
    by_uid, by_field = defaultdict(list), defaultdict(list)
    for item, ok in zip(items, correct):
        by_uid[item.uid].append(ok)
        if item.field:
            by_field[item.field].append(ok)
    out = {"items": len(items), "accuracy": _accuracy(correct),
           "uid_mean": _accuracy([_accuracy(v) for v in by_uid.values()]),
           "by_uid": {k: {"items": len(v), "accuracy": _accuracy(v)} for k, v in sorted(by_uid.items())}}
    if by_field:
        out["by_field"] = {k: {"items": len(v), "accuracy": _accuracy(v)} for k, v in sorted(by_field.items())}
    return out


@torch.no_grad()
def evaluate_task(model: "VisionLanguageModel", data: Path, task: str, images: Optional[Path] = None,
                  batch_size: int = 64, limit: Optional[int] = None) -> dict:
    items, bad = read_task(data, task, images)
    items = items[:limit] if limit else items
    if task == "winoground":
        kept, outcomes = winoground_scores(model, items, bad, batch_size)
        result = {"items": len(kept), "chance": {"text": 0.25, "image": 0.25, "group": 1 / 6, "text_unpaired": 0.5}}
        for scorer, rows in outcomes.items():
            result[scorer] = {k: _accuracy([r[k] for r in rows]) for k in ("text", "image", "group", "text_unpaired")}
            result[scorer]["by_tag"] = {uid: _accuracy([r["group"] for r, it in zip(rows, kept) if it.uid == uid])
                                        for uid in sorted({it.uid for it in kept})}
    else:
        kept, correct, truncated = rank_items(model, items, bad, batch_size, task == "vqa", task)
        result = summarize(kept, correct)
        result["chance"] = _accuracy([1 / len(item.completions) for item in kept])
        result["candidates_truncated"] = truncated
    result["bad_rows"] = dict(bad.counts)
    result["bad_row_examples"] = bad.examples
    return result


def format_results(results: dict[str, dict]) -> str:
    lines = [f"{'task':<18}{'score':>24}{'accuracy':>10}{'chance':>8}{'items':>7}  skipped"]

    def line(task: str, score: str, value: Optional[float], chance: float, items: int, skipped: str = "") -> None:
        shown = "-" if value is None else f"{100 * value:.1f}%"
        lines.append(f"{task:<18}{score:>24}{shown:>10}{100 * chance:>7.1f}%{items:>7}  {skipped}")

    for task, r in results.items():
        skipped = ", ".join(f"{n} {reason}" for reason, n in r["bad_rows"].items())
        if task == "winoground":
            for scorer in ("itm", "itc", "lm"):
                for score in ("text", "image", "group", "text_unpaired"):
                    value = r.get(scorer, {}).get(score)
                    line(task, f"{scorer} {score}", value, r["chance"][score], r["items"], skipped)
                    skipped = ""
        else:
            line(task, "accuracy (UID mean)", r["uid_mean"], r["chance"] or 0.0, r["items"], skipped)
            line(task, "accuracy (all items)", r["accuracy"], r["chance"] or 0.0, r["items"])
    return "\n".join(lines)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate_babylm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, checkpoint dir or exported model")
    parser.add_argument("--data", required=True, help="folder holding the tasks' folders (evaluation_data/...)")
    parser.add_argument("--tasks", default=",".join(TASK_FOLDERS), help="comma-separated: " + ", ".join(TASK_FOLDERS))
    parser.add_argument("--images", default=None, help="folder of Winoground and VQA images (default: the task "
                        "folder's images/, the task folder, then <data>/images)")
    parser.add_argument("--out", default="babylm_results.json")
    parser.add_argument("--batch_size", type=int, default=64, help="rows scored at once")
    parser.add_argument("--limit", type=int, default=None, help="the first N rows of each task")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0 when every task was scored, 2 for bad options, a model or a task folder that cannot load."""
    from .generate import quiet_library_output
    from .loading import load_model_for_command

    args = build_arg_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_FOLDERS]
    if unknown or not tasks or args.batch_size < 1:
        print(f"error: --tasks {args.tasks!r}: choose from {', '.join(TASK_FOLDERS)}" if unknown or not tasks
              else "error: --batch_size must be >= 1", file=sys.stderr)
        return 2
    data = Path(args.data)
    try:
        for task in tasks:
            task_folder(data, task)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet_library_output()
    loaded = load_model_for_command(args.checkpoint, args.device)
    if loaded is None:
        return 2
    model = loaded[0]
    results = {}
    for task in tasks:
        try:
            results[task] = evaluate_task(model, data, task, Path(args.images) if args.images else None,
                                          args.batch_size, args.limit)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for example in results[task]["bad_row_examples"]:
            print(f"skipped {example}", file=sys.stderr)
    print(format_results(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": str(data), "tasks": results},
                                         indent=1) + "\n")
    print(f"written {args.out}")
    return 0
