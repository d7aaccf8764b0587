"""Captioning: the CLI run for real (subprocess) on a tiny saved checkpoint, and the Python API."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from loravl.checkpoint import Checkpointer, RNGState, TrainState
from loravl.weights import ModelWeights
from loravl.config import RunConfig
from loravl.loading import export_model
from loravl.generate import (ImageReadError, caption_images, expand_image_inputs, generation_kwargs)
from loravl.model import VisionLanguageModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "src" / "generate_captions.py"
GOOD_NAMES = ("gray.png", "palette.png", "alpha.png", "cmyk.jpg", "deep16.png", "large.jpg")
BAD_NAMES = ("truncated.jpg", "text.jpg", "empty.png")


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.2, height * 0.2, width * 0.6, height * 0.6), fill=(220, 30, 30))
    return image


def write_good_images(folder: Path) -> list[Path]:
    """One file per awkward mode: L, P with transparency, RGBA, CMYK JPEG, 16-bit PNG, and a large JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _picture(50, 40)
    base.convert("L").save(folder / "gray.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png", transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "alpha.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    deep = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I;16")
    _picture(3000, 2000, seed=1).save(folder / "large.jpg", quality=85)
    return [folder / name for name in GOOD_NAMES]


def write_bad_files(folder: Path) -> list[Path]:
    """A JPEG cut in half, a text file named .jpg, an empty .png."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "whole.tmp"
    _picture(200, 150, seed=2).save(good, format="JPEG", quality=95)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return [folder / name for name in BAD_NAMES]


@pytest.fixture
def tiny_model(tiny_model_config, tiny_tokenizer) -> VisionLanguageModel:
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_model_config, tiny_tokenizer)
    with torch.no_grad():  # LoRA B starts at 0; make the adapter matter for the export round trip
        for _, p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def checkpoint_dir(tmp_path, tiny_model, tiny_model_config) -> Path:
    """A checkpoint dir (``step_00000005`` + ``latest``) written by the trainer's Checkpointer."""
    directory = tmp_path / "ckpt"
    Checkpointer(directory, keep_last=1, rank=0, world_size=1).save(
        5, ModelWeights(tiny_model), shared={}, per_rank={"rng": RNGState()}, train_state=TrainState(step=5),
        run_config=RunConfig(model=tiny_model_config).to_dict(), tokenizer=tiny_model.tokenizer)
    return directory


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def parse_captions(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        path, _, caption = line.partition("\t")
        out[Path(path).name] = caption
    return out


def test_cli_captions_good_images_and_reports_bad_ones(tmp_path, checkpoint_dir):
    folder = tmp_path / "photos"
    write_good_images(folder)
    write_bad_files(folder)
    output = tmp_path / "captions.jsonl"
    # The `latest` pointer file itself names the checkpoint, as in the README's example.
    result = run_cli("--checkpoint", str(checkpoint_dir / "latest"), "--images", str(folder),
                     "--batch_size", "4", "--max_new_tokens", "6", "--output", str(output))
    assert result.returncode == 1, result.stderr  # some inputs failed: a script must be able to tell
    captions = parse_captions(result.stdout)
    assert set(captions) == set(GOOD_NAMES) and all(captions.values())
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(BAD_NAMES), result.stderr
    for name, reason in (("truncated.jpg", "corrupt_image"), ("text.jpg", "not_an_image"),
                         ("empty.png", "empty_file")):
        assert any(name in line and reason in line for line in errors), (name, errors)
    assert "BytesIO" not in result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert {Path(r["image"]).name: r["caption"] for r in records if r["caption"]} == captions
    failed = {Path(r["image"]).name: r["error"] for r in records if r["caption"] is None}
    assert set(failed) == set(BAD_NAMES) and all(failed.values())
    good = run_cli("--checkpoint", str(checkpoint_dir), "--images", *(str(folder / n) for n in GOOD_NAMES),
                   "--max_new_tokens", "4")
    assert good.returncode == 0, good.stderr


def test_cli_exits_non_zero_when_nothing_is_captioned(tmp_path, checkpoint_dir):
    bad = write_bad_files(tmp_path / "bad")
    result = run_cli("--checkpoint", str(checkpoint_dir), "--images", *map(str, bad),
                     str(tmp_path / "missing.png"), "--max_new_tokens", "4")
    assert result.returncode == 1
    assert result.stdout == ""
    for name in (*BAD_NAMES, "missing.png"):
        assert any(name in line for line in result.stderr.splitlines() if line.startswith("error:")), name


@pytest.mark.parametrize("merge", [False, True])
def test_cli_reads_exported_folders_with_beam_search(tmp_path, tiny_model, tiny_model_config, merge):
    export = export_model(tiny_model, RunConfig(model=tiny_model_config), tmp_path / "export", merge_lora=merge)
    paths = write_good_images(tmp_path / "photos")[:2]
    expected = [r.caption for r in caption_images(tiny_model, paths, max_new_tokens=6, num_beams=2)]
    pattern = str(tmp_path / "photos" / "*.png")  # gray.png, palette.png ... as a glob
    result = run_cli("--checkpoint", str(export), "--images", pattern, "--num_beams", "2", "--max_new_tokens", "6")
    assert result.returncode == 0, result.stderr
    captions = parse_captions(result.stdout)
    assert captions["gray.png"] == expected[0] and captions["palette.png"] == expected[1]


def test_decoding_modes_and_batch_equals_single(tiny_model, tmp_path):
    images = [_picture(64, 48, seed=s) for s in range(5)]
    for kwargs in (generation_kwargs(), generation_kwargs(num_beams=3),
                   generation_kwargs(do_sample=True, top_p=0.9)):
        torch.manual_seed(0)
        # min_new_tokens: an untrained model may end at once; force some text so the comparison means something
        results = list(caption_images(tiny_model, images, batch_size=4, max_new_tokens=8, min_new_tokens=3,
                                      **kwargs))
        assert len(results) == 5 and all(r.error is None and isinstance(r.caption, str) and r.caption
                                         for r in results), (kwargs, results)
    batched = [r.caption for r in caption_images(tiny_model, images, batch_size=5, max_new_tokens=8,
                                                 min_new_tokens=3)]
    single = [next(caption_images(tiny_model, [image], max_new_tokens=8, min_new_tokens=3)).caption
              for image in images]
    assert batched == single


def test_cli_compile_gives_the_same_captions(tmp_path, checkpoint_dir, tiny_model):
    """--compile: static caches (compiled only on a GPU); the captions do not change. Beam search is refused."""
    paths = write_good_images(tmp_path / "photos")
    expected = {p.name: r.caption for p, r in zip(paths, caption_images(tiny_model, paths, max_new_tokens=6))}
    result = run_cli("--checkpoint", str(checkpoint_dir), "--images", *map(str, paths), "--max_new_tokens", "6",
                     "--batch_size", "4", "--compile")
    assert result.returncode == 0, result.stderr
    assert parse_captions(result.stdout) == expected
    with pytest.raises(ValueError, match="beam search"):
        generation_kwargs(num_beams=2, compile=True)


def test_python_api(checkpoint_dir, tmp_path):
    import loravl

    model, _ = loravl.load_model(checkpoint_dir)
    assert not model.training
    path = write_good_images(tmp_path / "photos")[0]
    captions = loravl.caption(model, [Image.open(path), path], max_new_tokens=6)
    assert len(captions) == 2 and captions[0] == captions[1]
    assert loravl.caption(model, str(path), max_new_tokens=6) == captions[:1]
    bad = write_bad_files(tmp_path / "bad")[1]
    with pytest.raises(ImageReadError, match="text.jpg"):
        loravl.caption(model, [path, bad], max_new_tokens=6)


def test_cli_writes_forgets_saves_and_reloads_a_memory(tmp_path, tiny_model_config, tiny_tokenizer):
    """--memory pairs.jsonl writes the pairs before captioning, --forget removes some, --save_memory keeps the
    result; --memory of that file captions as the in-process API does with the same memory."""
    import dataclasses

    from loravl.generate import caption, read_memory_pairs, write_memory_pairs

    cfg = dataclasses.replace(tiny_model_config, memory=dataclasses.replace(
        tiny_model_config.memory, enabled=True, slots=8, dim=16, episode_size=4))
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, tiny_tokenizer).eval()
    directory = tmp_path / "ckpt"
    Checkpointer(directory, keep_last=1, rank=0, world_size=1).save(
        5, ModelWeights(model), shared={}, per_rank={"rng": RNGState()}, train_state=TrainState(step=5),
        run_config=RunConfig(model=cfg).to_dict(), tokenizer=model.tokenizer)
    images = write_good_images(tmp_path / "photos")
    (tmp_path / "pairs.jsonl").write_text("\n".join(
        json.dumps({"image": f"photos/{p.name}", "caption": f"a red circle above a {colour} square"})
        for p, colour in zip(images, ("blue", "green", "yellow", "purple"))))
    (tmp_path / "forget.jsonl").write_text(json.dumps({"image": f"photos/{images[0].name}",
                                                       "caption": "a red circle above a blue square"}))
    saved = tmp_path / "memory.safetensors"
    first = run_cli("--checkpoint", str(directory), "--images", *map(str, images), "--max_new_tokens", "5",
                    "--memory", str(tmp_path / "pairs.jsonl"), "--forget", str(tmp_path / "forget.jsonl"),
                    "--save_memory", str(saved))
    assert first.returncode == 0 and saved.is_file(), first.stderr
    again = run_cli("--checkpoint", str(directory), "--images", *map(str, images), "--max_new_tokens", "5",
                    "--memory", str(saved))
    assert again.returncode == 0 and parse_captions(again.stdout) == parse_captions(first.stdout), again.stderr
    state = write_memory_pairs(model, read_memory_pairs(tmp_path / "pairs.jsonl"))
    state = write_memory_pairs(model, read_memory_pairs(tmp_path / "forget.jsonl"), state=state, forget=True)
    in_process = caption(model, images, max_new_tokens=5, memory=state)
    assert [parse_captions(first.stdout)[p.name] for p in images] == [" ".join(c.split()) for c in in_process]

    (tmp_path / "bad.jsonl").write_text('{"image": "photos/x.png"}\n')
    bad = run_cli("--checkpoint", str(directory), "--images", str(images[0]), "--memory", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 2 and "bad.jsonl, line 1" in bad.stderr, bad.stderr
    alone = run_cli("--checkpoint", str(directory), "--images", str(images[0]), "--forget", str(tmp_path / "forget.jsonl"))
    assert alone.returncode == 2 and "give the memory with --memory" in alone.stderr, alone.stderr


def test_expand_image_inputs(tmp_path):
    write_good_images(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    (tmp_path / "b").mkdir()
    paths, errors = expand_image_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "gray.png"),
                                         str(tmp_path / "a" / "*.jpg"), str(tmp_path / "b"),
                                         str(tmp_path / "nope.png"), str(tmp_path / "zz*.png")])
    assert [Path(p).name for p in paths] == sorted(GOOD_NAMES)  # folder first, repeats dropped
    assert [Path(e.source).name for e in errors] == ["b", "nope.png", "zz*.png"]
