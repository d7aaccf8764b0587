"""What the benchmark scripts share: the stage-1 model built offline, COCO-length synthetic captions and the tokenizer
the trainer would train on them, synthetic JPEGs, peak memory and result files."""
from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from loravl.config import ModelConfig, TextConfig, VisionConfig, load_config
from loravl.text import CaptionTokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DINOV2_BASE = ROOT / "configs/models/dinov2-base"  # the architecture of facebook/dinov2-base, no weights

_rng = random.Random(0)
WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 9))) for _ in range(40000)]


def stage1_model_config(image_size: int = 224, tiny: bool = False) -> ModelConfig:
    """configs/stage1.yaml's model with a randomly initialised dinov2-base (the same shapes and FLOPs offline);
    ``tiny``: small enough for a CPU smoke test of a script."""
    cfg = load_config(ROOT / "configs/stage1.yaml").model
    cfg.vision = VisionConfig(pretrained=str(DINOV2_BASE), random_init=True, image_size=image_size,
                              lora=cfg.vision.lora)
    if tiny:
        cfg.vision.pretrained = str(ROOT / "configs/models/dinov2-tiny")
        cfg.compressor.hidden_dim, cfg.compressor.embed_dim = 24, 16
        cfg.text = TextConfig(vocab_size=400, max_length=16, num_layers=1, hidden_size=32, num_heads=2)
        cfg.fusion.num_heads = 2
        cfg.loss.embed_dim, cfg.loss.queue_size = 16, 64
    return cfg


def random_captions(n: int, seed: int) -> list[str]:
    """COCO-length captions (8-14 words; COCO averages about 10.5) from the tokenizer's common words."""
    rng = random.Random(seed)
    common = WORDS[:2000]
    return [" ".join(rng.choice(common) for _ in range(rng.randint(8, 14))) for _ in range(n)]


def random_word_tokenizer(vocab_size: int, max_length: int) -> CaptionTokenizer:
    """A BPE of the requested size trained, as the trainer trains one, on a caption corpus: the common words become
    one token each (as COCO's mostly are), rare words fill the vocabulary. ``random_captions`` then come out at
    about COCO's token length."""
    corpus = [*random_captions(20000, seed=-1), *(" ".join(WORDS[i:i + 8]) for i in range(2000, len(WORDS), 8))]
    return CaptionTokenizer(train_tokenizer(corpus, vocab_size), max_length)


def _write_jpeg_range(job: tuple[str, int, int, tuple[int, int]]) -> None:
    from PIL import Image

    folder, start, stop, size = job
    for i in range(start, stop):
        rng = torch.Generator().manual_seed(i)
        low = torch.randint(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=torch.uint8, generator=rng)
        Image.fromarray(low.numpy()).resize(size).save(Path(folder) / f"{i:06d}.jpg", quality=90)


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> Path:
    """``n`` photo-sized noisy JPEGs (written by all cores) and a JSONL manifest over them, ``manifest.jsonl``;
    kept between runs."""
    from concurrent.futures import ProcessPoolExecutor

    manifest = folder / "manifest.jsonl"
    if manifest.is_file() and sum(1 for _ in manifest.open()) >= n:
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    chunk = 500
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_jpeg_range, [(str(folder), s, min(s + chunk, n), size) for s in range(0, n, chunk)]))
    captions = random_captions(n, seed=0)
    with manifest.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"image": f"{i:06d}.jpg", "caption": captions[i]}) + "\n")
    return manifest


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """What a result was measured on."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}


def write_results(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
