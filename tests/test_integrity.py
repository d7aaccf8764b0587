"""loravl.integrity through the Checkpointer: a damaged or incomplete checkpoint is named with its piece, resume
passes over it to the newest good one, a non-finite tensor is never saved, and a full disk is said so."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_batch
from loravl.checkpoint import (LATEST, Checkpointer, RNGState, TrainState, find_start, newest_usable_checkpoint)
from loravl.config import ConfigError, RunConfig
from loravl.integrity import CheckpointError
from loravl.loading import load_model
from loravl.model import VisionLanguageModel
from loravl.weights import ModelWeights


@pytest.fixture
def saved(tmp_path, tiny_model_config, tiny_tokenizer):
    """A model, its optimizer, and a checkpoint dir with steps 1, 2 and 3 (latest: 3)."""
    cfg = RunConfig(model=tiny_model_config)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.model, tiny_tokenizer).train()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3)
    model(**tiny_batch(tiny_tokenizer, seed=1))["loss"].backward()
    optimizer.step()
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=5, rank=0, world_size=1)
    for step in (1, 2, 3):
        checkpointer.save(step, ModelWeights(model), {"optimizer": optimizer}, {"rng": RNGState()},
                          TrainState(step=step), cfg.to_dict(), tiny_tokenizer)
    return model, optimizer, checkpointer, tmp_path / "ckpt"


def load(checkpointer, folder, model, optimizer):
    return checkpointer.load(folder, ModelWeights(model), {"optimizer": optimizer}, {"rng": RNGState()},
                             TrainState())


def overwrite_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = os.urandom(count)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("piece,damage,says", [
    ("model.safetensors", "random_bytes", "does not match the checksum"),
    ("model.safetensors", "truncate", "bytes, .* were written"),
    ("optimizer.pt", "random_bytes", "does not match the checksum"),
    ("rank_0.pt", "truncate", "does not match the checksum"),
    ("train_state.json", "drop_key", "does not match the checksum"),
    ("tokenizer/tokenizer.json", "missing", "is missing"),
])
def test_a_damaged_piece_is_named_with_its_checkpoint(saved, piece, damage, says):
    model, optimizer, checkpointer, directory = saved
    folder = directory / "step_00000003"
    path = folder / piece
    if damage == "random_bytes":
        overwrite_middle(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "drop_key":
        path.write_text(path.read_text().replace('"step"', '"stpe"'))  # same size: only the checksum can tell
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=rf"step_00000003: {piece}.*{says}"):
        load(checkpointer, folder, model, optimizer)
    if piece != "rank_0.pt":  # inference needs no rank piece
        with pytest.raises(CheckpointError, match="step_00000003"):
            load_model(folder)
    # --resume latest passes over it, says why, and takes step 2
    chosen, skipped = newest_usable_checkpoint(directory)
    assert chosen.name == "step_00000002" and skipped[0][0] == "step_00000003" and "step_00000003" in skipped[0][1]
    assert load(checkpointer, chosen, model, optimizer).name == "step_00000002"


def test_without_checksums_library_errors_still_name_the_piece(saved):
    """A checkpoint of an earlier release (no checksums) loads unverified; a broken piece still names itself."""
    model, optimizer, checkpointer, directory = saved
    folder = directory / "step_00000003"
    (folder / "checksums.json").unlink()
    (folder / "train_state.json").write_text('{"epoch": 0}')
    with pytest.raises(CheckpointError, match=r"step_00000003: train_state.json cannot be read: KeyError"):
        load(checkpointer, folder, model, optimizer)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"step_00000003: model.safetensors cannot be read"):
        load(checkpointer, folder, model, optimizer)


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"", b"step_00000099\n"])
def test_a_broken_latest_pointer_falls_back_to_the_newest_checkpoint(saved, pointer, caplog):
    _, _, _, directory = saved
    (directory / LATEST).write_bytes(pointer)
    chosen = find_start(directory, "latest", overwrite=False, rank=0)
    assert chosen.name == "step_00000003"


def test_no_usable_checkpoint_fails_naming_each(saved):
    _, _, _, directory = saved
    for step in (1, 2, 3):
        overwrite_middle(directory / f"step_0000000{step}" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_00000003: .*step_00000001: "):
        find_start(directory, "latest", overwrite=False, rank=0)


def test_a_run_is_not_overwritten_by_accident(saved):
    """A fresh start into a folder that holds a run is refused with the ways out; --overwrite deletes it first."""
    _, _, _, directory = saved
    with pytest.raises(ConfigError, match=r"already holds a run \(3 checkpoint\(s\).*--resume latest.*"
                                          r"--train.checkpoint.dir.*--train.overwrite true"):
        find_start(directory, "", overwrite=False, rank=0)
    assert find_start(directory, "", overwrite=True, rank=0) is None
    assert not list(directory.glob("step_*")) and not (directory / LATEST).exists()
    assert find_start(directory, "", overwrite=False, rank=0) is None  # nothing left to protect


@pytest.mark.parametrize("where", ["frozen_lora", "optimizer"])
def test_non_finite_values_anywhere_are_never_saved(saved, where):
    model, optimizer, checkpointer, directory = saved
    with torch.no_grad():
        if where == "frozen_lora":  # LoRA does not train in phase 1, but the checkpoint holds it
            name, param = next((n, p) for n, p in model.lora_parameters() if "lora_A" in n)
            assert not param.requires_grad
            param[0, 0] = float("nan")
        else:
            next(iter(optimizer.state.values()))["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match="not saving step 4: non-finite values in"):
        checkpointer.save(4, ModelWeights(model), {"optimizer": optimizer}, {"rng": RNGState()},
                          TrainState(step=4), {}, model.tokenizer)
    assert (directory / LATEST).read_text().strip() == "step_00000003"
    assert not (directory / "step_00000004").exists() and not (directory / ".tmp-step_00000004").exists()


def test_a_full_disk_is_said_so_and_the_last_checkpoint_stays(tmp_path, saved):
    """A checkpoint dir on a filesystem with room for one checkpoint and a half: the second write fails saying the
    disk is full, where, and how much is needed; nothing half-written is left and the first stays latest."""
    model, optimizer, _, directory = saved
    small = tmp_path / "small"
    small.mkdir()
    one = sum(p.stat().st_size for p in (directory / "step_00000001").rglob("*") if p.is_file())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(3 * one // 2) // 1024 + 64}k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        import shutil
        shutil.copytree(directory / "step_00000001", small / "ckpt" / "step_00000001")
        (small / "ckpt" / LATEST).write_text("step_00000001\n")
        checkpointer = Checkpointer(small / "ckpt", keep_last=5, rank=0, world_size=1)
        with pytest.raises(OSError, match=r"disk full: the checkpoint needs about \d+ MiB in .*small/ckpt, \d+ MiB "
                                          r"are free"):
            checkpointer.save(5, ModelWeights(model), {"optimizer": optimizer}, {"rng": RNGState()},
                              TrainState(step=5), {}, model.tokenizer)
        assert (small / "ckpt" / LATEST).read_text().strip() == "step_00000001"
        assert sorted(p.name for p in (small / "ckpt").iterdir()) == [LATEST, "step_00000001"]
        assert not [p for p in (small / "ckpt").rglob("*") if ".tmp-" in str(p)]
    finally:
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)  # still open somewhere: detach it
    assert subprocess.run(["mountpoint", "-q", str(small)]).returncode != 0
