"""Checkpoint pieces and load_model, in process with the tiny model (no mocks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_batch
from loravl.checkpoint import LATEST, Checkpointer, RNGState, TrainState, list_checkpoints, read_train_state
from loravl.config import RunConfig
from loravl.loading import export_model, load_model
from loravl.weights import ModelWeights
from loravl.model import VisionLanguageModel


def _trained_looking_model(model_cfg, tokenizer) -> VisionLanguageModel:
    torch.manual_seed(0)
    model = VisionLanguageModel(model_cfg, tokenizer)
    with torch.no_grad():  # LoRA B starts at 0 (a no-op); make the adapter matter
        for name, p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    # One training forward fills part of the ITC queue, so queue buffers are non-trivial too.
    model.train()
    model(**{k: v for k, v in tiny_batch(tokenizer, seed=1).items()})
    return model.eval()


@torch.no_grad()
def _outputs(model: VisionLanguageModel, batch: dict) -> dict[str, torch.Tensor]:
    image = model.encode_image(batch["pixel_values"])
    return {"encoder": image["encoder_tokens"], "image_feat": image["image_feat"],
            "logits": model.caption_logits(image["image_tokens"], batch["input_ids"], batch["attention_mask"])}


def _save(model, cfg, directory: Path, step: int, keep_last: int = 3) -> Path:
    return Checkpointer(directory, keep_last=keep_last, rank=0, world_size=1).save(
        step, ModelWeights(model), shared={}, per_rank={"rng": RNGState()},
        train_state=TrainState(epoch=1, step=step), run_config=cfg.to_dict(), tokenizer=model.tokenizer)


def test_load_model_from_checkpoint_and_pointer(tmp_path, tiny_model_config, tiny_tokenizer):
    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    folder = _save(model, cfg, tmp_path / "ckpt", step=7)
    batch = tiny_batch(tiny_tokenizer, seed=3)
    expected = _outputs(model, batch)
    # The frozen pretrained encoder weights are not in the file (they reload from vision.pretrained)...
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("vision.") and "lora_" not in k for k in keys)
    assert any("lora_A" in k for k in keys) and "queue.image_feats" in keys and "text_m.wte.weight" in keys
    # ...and load_model takes the folder or the directory with its pointer.
    for path in (folder, tmp_path / "ckpt"):
        loaded, loaded_cfg = load_model(path)
        assert not loaded.training
        assert loaded_cfg.model.text.hidden_size == cfg.model.text.hidden_size
        got = _outputs(loaded, batch)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
        assert torch.equal(loaded.queue.image_feats, model.queue.image_feats)
        assert loaded.text.lm_head.weight.data_ptr() == loaded.text.transformer.wte.weight.data_ptr()
    assert read_train_state(tmp_path / "ckpt").step == 7


@pytest.mark.parametrize("merge", [False, True])
def test_export_round_trip(tmp_path, tiny_model_config, tiny_tokenizer, merge):
    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    batch = tiny_batch(tiny_tokenizer, seed=4)
    expected = _outputs(model, batch)
    out = export_model(model, cfg, tmp_path / "export", merge_lora=merge)
    assert (out / "vision_adapter" / "adapter_config.json").is_file()
    assert (out / "vision_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "vision_backbone" / "config.json").is_file()
    assert json.loads((out / "loravl_export.json").read_text())["lora_merged"] is merge
    # Exporting leaves the trained model as it was (LoRA still injected, not merged).
    assert any("lora_A" in n for n, _ in model.named_parameters())
    loaded, _ = load_model(out)
    got = _outputs(loaded, batch)
    tol = dict(rtol=1e-4, atol=1e-5) if merge else dict(rtol=0, atol=0)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=name)
    # A merged backbone alone differs from the pretrained one (the adapter is inside it).
    if merge:
        from transformers import AutoModel
        plain = AutoModel.from_pretrained(str(out / "vision_backbone")).state_dict()
        base = AutoModel.from_pretrained(tiny_model_config.vision.pretrained).state_dict()
        query = next(k for k in base if "layer.0." in k and ("query" in k or "q_proj" in k) and k.endswith("weight"))
        assert not torch.equal(plain[query], base[query])


def test_keep_last_and_latest_pointer(tmp_path, tiny_model_config, tiny_tokenizer):
    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    for step in (1, 2, 3, 4):
        _save(model, cfg, tmp_path / "ckpt", step=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_00000003", "step_00000004"]
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == "step_00000004"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ckpt").iterdir())


def test_rng_state_round_trip_with_weights_only_load(tmp_path):
    import random

    import numpy as np
    rng = RNGState()
    torch.save(rng.state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    rng.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_a_loader_state_from_before_the_continuous_loader_fails_naming_the_file(tmp_path, tiny_model_config,
                                                                                tiny_tokenizer):
    """A mid-epoch loader state written before the train loader ran on across epochs has no ``batches_done``:
    resuming from it stops with an error naming the rank's file and what is missing, not a bare KeyError."""
    from loravl.config import DataConfig
    from loravl.data import build_dataloader, build_dataset, ensure_demo_data

    root = ensure_demo_data(tmp_path / "demo", train_size=8, val_size=4, image_size=32, seed=0)
    data_cfg = DataConfig(format="jsonl", train_path=str(root / "train" / "captions.jsonl"))
    loader = build_dataloader(build_dataset(data_cfg, "train", 32), data_cfg, 2, train=True, seed=0, num_workers=0)
    next(iter(loader))
    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=2, rank=0, world_size=1)
    folder = checkpointer.save(1, ModelWeights(model), shared={}, per_rank={"loader": loader},
                               train_state=TrainState(step=1, step_in_epoch=1), run_config=cfg.to_dict(),
                               tokenizer=model.tokenizer)
    rank_file = folder / "rank_0.pt"
    state = torch.load(rank_file, weights_only=True)
    del state["loader"]["batches_done"]
    torch.save(state, rank_file)
    (folder / "rank_0.pt.sha256").unlink()  # as that release wrote it: no checksum beside it
    with pytest.raises(ValueError, match=r"rank_0\.pt: its 'loader' state cannot be restored: .*batches_done"):
        checkpointer.load(folder, ModelWeights(model), {}, {"loader": loader}, TrainState())


def test_background_save_writes_the_state_of_the_moment_it_was_called(tmp_path, tiny_model_config, tiny_tokenizer,
                                                                       monkeypatch):
    """``background``: save() returns while the checkpoint is still being written (``latest`` not there yet), the
    weights and optimizer moments changed after it returns are not what is written, and wait() leaves it complete.
    The writer thread is held before it writes anything, so the step below runs first: what it writes must be a
    copy (``CpuStaging``), even of CPU tensors. The copies are checked on their own too."""
    from loravl.checkpoint import DELAYED_WRITE_ENV, SLOW_SAVE_ENV
    from loravl.weights import CpuStaging, read_weights

    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    weights_then = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
    moment_then = optimizer.state[params[0]]["exp_avg"].clone()
    staging = CpuStaging()
    snapshot, _ = ModelWeights(model).snapshot(staging)
    optimizer_copy = staging.copy(optimizer.state_dict(), ("optimizer",))
    staging.finish()
    optimizer.step()
    assert any(not torch.equal(p, weights_then[k]) for k, p in model.checkpoint_state_dict().items())
    assert all(torch.equal(snapshot[k], weights_then[k]) for k in snapshot)
    assert torch.equal(optimizer_copy["state"][0]["exp_avg"], moment_then)
    weights_then = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
    moment_then = optimizer.state[params[0]]["exp_avg"].clone()
    monkeypatch.setenv(DELAYED_WRITE_ENV, "3:1")  # the write of step 3 starts after the step below
    monkeypatch.setenv(SLOW_SAVE_ENV, "3:0.5")  # and sleeps before its rename
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=2, rank=0, world_size=1, background=True)
    folder = checkpointer.save(3, ModelWeights(model), shared={"optimizer": optimizer}, per_rank={"rng": RNGState()},
                               train_state=TrainState(epoch=0, step=3),
                               run_config=cfg.to_dict(), tokenizer=model.tokenizer)
    assert not (tmp_path / "ckpt" / LATEST).exists() and not folder.exists()
    optimizer.step()  # the training goes on: weights and AdamW moments change in place
    assert not torch.equal(optimizer.state[params[0]]["exp_avg"], moment_then)
    assert any(not torch.equal(p, weights_then[k]) for k, p in model.checkpoint_state_dict().items())
    checkpointer.wait()
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == folder.name
    written = read_weights(folder / "model.safetensors")
    assert set(written) == set(weights_then)
    for key, value in weights_then.items():
        assert torch.equal(written[key], value), key
    saved_optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert torch.equal(saved_optimizer["state"][0]["exp_avg"], moment_then)
    assert read_train_state(folder).step == 3


def test_background_saves_reuse_their_buffers_only_after_the_write_before(tmp_path, tiny_model_config,
                                                                           tiny_tokenizer, monkeypatch):
    """A background save copies into the buffers the save before it used (no new memory each time), so it must
    wait for that save's write first: the first write is held here until after the second save was called, and
    each checkpoint must still hold its own step's weights and moments. A piece that changes shape (the optimizer
    gains LoRA's moments at the phase switch) gets new buffers, and the ones no longer used are let go."""
    from loravl.checkpoint import DELAYED_WRITE_ENV
    from loravl.weights import CpuStaging, read_weights

    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=3, rank=0, world_size=1, background=True)
    expected = {}
    monkeypatch.setenv(DELAYED_WRITE_ENV, "1:1")  # step 1's write starts a second after its save returned
    for step in (1, 2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        expected[step] = ({k: v.clone() for k, v in model.checkpoint_state_dict().items()},
                          optimizer.state[params[0]]["exp_avg"].clone())
        checkpointer.save(step, ModelWeights(model), shared={"optimizer": optimizer}, per_rank={"rng": RNGState()},
                          train_state=TrainState(step=step), run_config=cfg.to_dict(), tokenizer=model.tokenizer)
    checkpointer.wait()
    for step, (weights, moment) in expected.items():
        folder = tmp_path / "ckpt" / f"step_{step:08d}"
        written = read_weights(folder / "model.safetensors")
        assert all(torch.equal(written[k], v) for k, v in weights.items()), step
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        assert torch.equal(saved["state"][0]["exp_avg"], moment), step
    assert not torch.equal(expected[1][1], expected[2][1])

    staging = CpuStaging()
    first = staging.copy({"weight": torch.ones(4), "gone": torch.ones(2)}, ("model",))
    staging.finish()
    again = staging.copy({"weight": torch.full((4,), 2.0), "new": torch.zeros(3)}, ("model",))
    staging.finish()
    assert again["weight"].data_ptr() == first["weight"].data_ptr() and torch.equal(first["weight"], again["weight"])
    assert torch.equal(again["weight"], torch.full((4,), 2.0))
    resized = staging.copy({"weight": torch.ones(5), "new": torch.ones(3)}, ("model",))
    staging.finish()
    assert resized["weight"].shape == (5,) and resized["new"].data_ptr() == again["new"].data_ptr()
    assert set(staging._buffers) == {("model", "weight"), ("model", "new")}


def test_a_failed_background_write_is_raised_by_wait(tmp_path, tiny_model_config, tiny_tokenizer, monkeypatch):
    """The writer thread's error reaches the training thread at the next wait() (or save()), naming the folder,
    and ``latest`` still names the checkpoint before it."""
    import shutil
    import time

    from loravl.checkpoint import SLOW_SAVE_ENV

    cfg = RunConfig(model=tiny_model_config)
    model = _trained_looking_model(cfg.model, tiny_tokenizer)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=3, rank=0, world_size=1, background=True)

    def save(step: int) -> Path:
        return checkpointer.save(step, ModelWeights(model), shared={}, per_rank={"rng": RNGState()},
                                 train_state=TrainState(step=step), run_config=cfg.to_dict(), tokenizer=model.tokenizer)

    save(1)
    monkeypatch.setenv(SLOW_SAVE_ENV, "2:2")  # step 2's pieces are written, then the writer sleeps before the rename
    save(2)
    pieces = tmp_path / "ckpt" / ".tmp-step_00000002"
    deadline = time.time() + 30
    # The last piece written: after it the writer only syncs and sleeps, so removing the folder does not race the
    # files it is still creating
    while not (pieces / "checksums.json").is_file():
        assert time.time() < deadline
        time.sleep(0.05)
    shutil.rmtree(pieces)  # the folder goes away under the writer: its rename fails
    with pytest.raises(RuntimeError, match="writing a checkpoint into .*ckpt failed"):
        checkpointer.wait()
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == "step_00000001"
    checkpointer.wait()  # the error was raised once; the checkpointer goes on
    save(3)
    checkpointer.wait()
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == "step_00000003"
