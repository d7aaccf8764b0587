"""Captioning images with a trained model: the library side of ``src/generate_captions.py`` and ``model.caption``.

Images are decoded by the data layer (``load_rgb_image``: any mode or bit depth to RGB, a ``Skip`` with the reason
for a file that cannot be read) and prepared with its eval transform, so captioning sees exactly what validation
sees. Decoding runs in a small thread pool (PIL releases the GIL while decoding); generation runs batched through
transformers' ``generate()`` (greedy, beam search or sampling), under bf16 autocast on a GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from loravl.config import DataConfig
from loravl.device import bf16_autocast, resolve_device
from loravl.data.formats import IMAGE_EXTENSIONS
from loravl.data.images import build_transform, load_rgb_image, to_rgb
from loravl.data.skips import Skip, readable_detail

from loravl.memory import MemoryState

if TYPE_CHECKING:
    from loravl.model import VisionLanguageModel

ImageInput = Union[str, os.PathLike, Image.Image]

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class CaptionResult:
    """One input image: its caption, or why it has none."""

    source: str
    caption: Optional[str] = None
    error: Optional[str] = None


class ImageReadError(ValueError):
    """Raised by ``caption`` (the strict API) when some images cannot be read; names each file and reason."""


# -- devices and generation options -------------------------------------------------------------------------------


def generation_kwargs(num_beams: int = 1, do_sample: bool = False, top_p: Optional[float] = None,
                      top_k: Optional[int] = None, temperature: Optional[float] = None,
                      compile: bool = False) -> dict[str, Any]:
    """Arguments for ``VisionLanguageModel.generate`` and transformers' ``generate()``; sampling knobs are passed
    only with ``do_sample`` (transformers warns about them otherwise)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if compile and num_beams > 1:
        raise ValueError("compile: compiled decoding is for greedy decoding and sampling, not beam search")
    kwargs: dict[str, Any] = {"num_beams": num_beams, "do_sample": do_sample}
    if compile:
        kwargs["compile"] = True
    if do_sample:
        if top_p is not None:
            kwargs["top_p"] = top_p
        if top_k is not None:
            kwargs["top_k"] = top_k
        if temperature is not None:
            kwargs["temperature"] = temperature
    return kwargs


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_captions(model: "VisionLanguageModel", pixel_values: torch.Tensor, max_new_tokens: int = 30,
                      **generate_kwargs: Any) -> list[str]:
    """Captions for a batch of already-transformed images, on the model's device (bf16 autocast on a GPU)."""
    device = model_device(model)
    pixel_values = pixel_values.to(device, non_blocking=True)
    # <bos> and <pad> are never caption tokens; an undertrained model may still loop on <bos>, which decodes to ""
    generate_kwargs.setdefault("suppress_tokens", [model.tokenizer.bos_id, model.tokenizer.pad_id])
    with bf16_autocast(device):
        return model.generate(pixel_values, max_new_tokens=max_new_tokens, **generate_kwargs)


# -- inputs -------------------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def expand_image_inputs(inputs: Sequence[Union[str, os.PathLike]]) -> tuple[list[str], list[CaptionResult]]:
    """Files, folders (searched recursively for image extensions) and glob patterns -> image paths, in order,
    without repeats. A file named explicitly is kept whatever its extension (the decoder judges it); an input that
    names nothing becomes an error result."""
    paths: list[str] = []
    errors: list[CaptionResult] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = str(path)
        if key not in seen:
            seen.add(key)
            paths.append(key)

    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p))
            if not found:
                errors.append(CaptionResult(text, error="folder holds no image files"))
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                errors.append(CaptionResult(text, error="no files match this pattern"))
            for m in files:
                add(m)
        else:
            errors.append(CaptionResult(text, error="no such file or folder"))
    return paths, errors


def describe_skip(skip: Skip, source: str = "") -> str:
    """"corrupt_image (image file is truncated)"; a detail that only repeats the file name is left out, and one
    that names the in-memory stream PIL read (``<_io.BytesIO object at 0x...>``) names the file instead."""
    detail = readable_detail(skip.detail, source)
    return f"{skip.reason} ({detail})" if detail and detail != source else skip.reason


class ImagePreparer:
    """Path or PIL image -> eval tensor [3, S, S], or a ``Skip``. Uses the data layer's loader and transform."""

    def __init__(self, image_size: int, max_pixels: int, min_size: int):
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.min_size = min_size
        self.transform = build_transform(image_size, train=False)

    def __call__(self, image: ImageInput) -> Union[torch.Tensor, Skip]:
        if isinstance(image, Image.Image):
            try:
                rgb = to_rgb(image)
            except Exception as e:  # noqa: BLE001 - an odd in-memory image is one failure, not the whole batch
                return Skip("read_error", f"{type(e).__name__}: {e}")
        else:
            loaded = load_rgb_image(image, max_pixels=self.max_pixels, min_size=self.min_size,
                                    target_size=self.image_size, as_tensor=True)
            if isinstance(loaded, Skip):
                return loaded
            rgb = loaded
        return self.transform(rgb)


def _source_name(image: ImageInput, index: int) -> str:
    return f"<image {index}>" if isinstance(image, Image.Image) else os.fspath(image)


def caption_images(model: "VisionLanguageModel", images: Iterable[ImageInput], *, batch_size: int = 64,
                   max_new_tokens: int = 30, data_cfg: Optional[DataConfig] = None, num_workers: Optional[int] = None,
                   **generate_kwargs: Any) -> Iterator[CaptionResult]:
    """Caption each image (path or PIL image), batch by batch, in input order; unreadable ones come back as
    results with ``error`` set instead of stopping the rest. ``generate_kwargs`` go to ``generate()``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data_cfg = data_cfg or DataConfig()
    prepare = ImagePreparer(model.cfg.vision.image_size, data_cfg.max_image_pixels, data_cfg.min_image_size)
    num_workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            batch: list[tuple[int, ImageInput]] = []
            for index, image in enumerate(images):
                batch.append((index, image))
                if len(batch) == batch_size:
                    yield from _caption_batch(model, batch, prepare, pool.map, max_new_tokens, generate_kwargs)
                    batch = []
            if batch:
                yield from _caption_batch(model, batch, prepare, pool.map, max_new_tokens, generate_kwargs)
    finally:
        model.train(was_training)


def _caption_batch(model: "VisionLanguageModel", batch: list[tuple[int, ImageInput]],
                   prepare: Callable[[ImageInput], Union[torch.Tensor, Skip]], map_fn: Callable,
                   max_new_tokens: int, generate_kwargs: dict[str, Any]) -> list[CaptionResult]:
    prepared = list(map_fn(prepare, [image for _, image in batch]))
    good = [i for i, p in enumerate(prepared) if isinstance(p, torch.Tensor)]
    captions: dict[int, str] = {}
    if good:
        pixel_values = torch.stack([prepared[i] for i in good])
        for i, text in zip(good, generate_captions(model, pixel_values, max_new_tokens, **generate_kwargs)):
            captions[i] = " ".join(text.split())  # one line: a stray newline/tab would break "path<TAB>caption"
    results = []
    for i, (index, image) in enumerate(batch):
        name = _source_name(image, index)
        item = prepared[i]
        if isinstance(item, Skip):
            results.append(CaptionResult(name, error=describe_skip(item, name)))
        else:
            results.append(CaptionResult(name, caption=captions[i]))
    return results


def caption(model: "VisionLanguageModel", images: Union[ImageInput, Sequence[ImageInput]], *,
            batch_size: int = 64, max_new_tokens: int = 30, **generate_kwargs: Any) -> list[str]:
    """The strict API behind ``model.caption``: one caption per image (a single image gives a one-item list);
    raises ``ImageReadError`` naming every image that could not be read."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    results = list(caption_images(model, images, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  **generate_kwargs))
    failed = [r for r in results if r.error is not None]
    if failed:
        raise ImageReadError("cannot read " + "; ".join(f"{r.source}: {r.error}" for r in failed))
    return [r.caption or "" for r in results]


# -- episodic memory ----------------------------------------------------------------------------------------------


def read_memory_pairs(path: Union[str, os.PathLike]) -> list[tuple[str, str]]:
    """A JSONL file of ``{"image": path, "caption": text}`` lines (image paths relative to the file's folder)."""
    path = Path(path)
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the memory pairs ({e.strerror or e})") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, text = row["image"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {number}: expected {{\"image\": path, \"caption\": text}}") from e
        pairs.append((os.fspath(path.parent / image), str(text)))
    if not pairs:
        raise ValueError(f"{path}: no image-caption pairs")
    return pairs


def write_memory_pairs(model: "VisionLanguageModel", pairs: Sequence[tuple[ImageInput, str]],
                       state: Optional[MemoryState] = None, forget: bool = False,
                       data_cfg: Optional[DataConfig] = None) -> MemoryState:
    """``model.write_memory`` for image files (or PIL images) and captions; an image that cannot be read is an
    error naming it, since a pair silently left out would not be recalled."""
    data_cfg = data_cfg or DataConfig()
    prepare = ImagePreparer(model.cfg.vision.image_size, data_cfg.max_image_pixels, data_cfg.min_image_size)
    prepared = [prepare(image) for image, _ in pairs]
    failed = [f"{_source_name(image, i)}: {describe_skip(p, _source_name(image, i))}"
              for i, ((image, _), p) in enumerate(zip(pairs, prepared)) if isinstance(p, Skip)]
    if failed:
        raise ImageReadError("cannot read " + "; ".join(failed))
    was_training = model.training
    model.eval()
    try:
        pixel_values = torch.stack(prepared).to(model_device(model))
        with bf16_autocast(pixel_values.device):
            return model.write_memory(pixel_values, [text for _, text in pairs], state=state, forget=forget)
    finally:
        model.train(was_training)


# -- command line -------------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_captions.py",
        description="Caption images with a trained loravl model; prints 'path<TAB>caption' per image.",
        epilog="Exit status: 0 when every input was captioned, 1 when any was not (each named on stderr, and in "
               "--output as a row with its error), 2 for bad options or a model that cannot be loaded.")
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint folder, a checkpoint dir with a 'latest' pointer "
                             "(or its 'latest'), or an exported model folder")
    parser.add_argument("--images", nargs="+", required=True, help="image files, folders and glob patterns")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy/beam decoding")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for --do_sample")
    parser.add_argument("--compile", action="store_true",
                        help="on a GPU: compiled encoder, static KV cache and a compiled decoding step (CUDA "
                             "graphs); the first batch compiles, later ones run faster (BENCHMARKS.md)")
    parser.add_argument("--memory", default=None,
                        help="write image-caption pairs into the model's episodic memory first: a JSONL file of "
                             "{\"image\": path, \"caption\": text} lines, or a memory saved with --save_memory")
    parser.add_argument("--forget", default=None, help="pairs (JSONL, as --memory) to remove from that memory")
    parser.add_argument("--save_memory", default=None, help="save the memory (safetensors) for a later --memory")
    parser.add_argument("--output", default=None, help="also write JSONL lines {image, caption}")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--num_workers", type=int, default=None, help="image decoding threads")
    return parser


def quiet_library_output() -> None:
    """Keep stderr for our own error lines: no weight-loading progress bars or transformers deprecation notes."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0 when every input was captioned, 1 when any was not, 2 for bad options or model."""
    from loravl.loading import load_model

    args = build_arg_parser().parse_args(argv)
    quiet_library_output()
    try:
        gen_kwargs = generation_kwargs(args.num_beams, args.do_sample, args.top_p, args.top_k, args.temperature,
                                       args.compile)
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths, input_errors = expand_image_inputs(args.images)
    for result in input_errors:
        print(f"error: {result.source}: {result.error}", file=sys.stderr)
    if not paths:
        print("error: no images to caption", file=sys.stderr)
        _write_rows(args.output, input_errors)
        return 1

    try:
        model, run_cfg = load_model(args.checkpoint, device)
    except (OSError, ValueError, RuntimeError) as e:  # missing folder, bad config, weights that do not match
        print(f"error: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    memory = None
    if args.memory or args.forget:
        try:
            memory = prepare_memory(model, args, run_cfg.data, device)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        gen_kwargs["memory"] = memory

    results: list[CaptionResult] = list(input_errors)
    for result in caption_images(model, paths, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 data_cfg=run_cfg.data, num_workers=args.num_workers, **gen_kwargs):
        results.append(result)
        if result.error is not None:
            print(f"error: {result.source}: {result.error}", file=sys.stderr, flush=True)
        else:
            print(f"{result.source}\t{result.caption}", flush=True)
    _write_rows(args.output, results)
    failed = sum(r.error is not None for r in results)
    total = len(paths) + len(input_errors)
    print(f"captioned {total - failed} of {total} inputs" + (f", {failed} failed" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


def prepare_memory(model: "VisionLanguageModel", args: argparse.Namespace, data_cfg: DataConfig,
                   device: torch.device) -> MemoryState:
    """--memory (pairs written at once, or a saved memory), then --forget (pairs removed one by one)."""
    if not args.memory:
        raise ValueError("--forget removes pairs from a memory: give the memory with --memory")
    if args.memory.endswith(".safetensors"):
        state = MemoryState.load(args.memory, device)
    else:
        state = write_memory_pairs(model, read_memory_pairs(args.memory), data_cfg=data_cfg)
    if args.forget:
        state = write_memory_pairs(model, read_memory_pairs(args.forget), state=state, forget=True, data_cfg=data_cfg)
    if args.save_memory:
        state.save(args.save_memory)
    return state


def _write_rows(path: Optional[str], results: Sequence[CaptionResult]) -> None:
    """``--output``: a JSONL row per input, its caption or (caption null) the reason it has none."""
    if not path:
        return
    with open(path, "w", encoding="utf-8") as output:
        for r in results:
            row = {"image": r.source, "caption": r.caption} if r.error is None else \
                {"image": r.source, "caption": None, "error": r.error}
            output.write(json.dumps(row) + "\n")
