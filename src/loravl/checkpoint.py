"""Training checkpoints: a set of stateful pieces written to a temporary folder and renamed into place.

A checkpoint folder ``<checkpoint_dir>/step_00001000/`` holds

    model.safetensors      model.checkpoint_state_dict() (trainable, LoRA, momentum copies, ITC queue)
    optimizer.pt           AdamW state and param groups (the same on every rank)
    scheduler.pt           the LR schedule's position
    scaler.pt              the fp16 grad scaler (only when one is used)
    train_state.json       epoch, step, phase (TrainState)
    rank_<r>.pt            per rank: RNG states (torch, cuda, numpy, python) and the data loader's position
    config.yaml            the resolved RunConfig (``RunConfig.to_dict()``)
    tokenizer/             the caption tokenizer
    vision_config/         the backbone's HF config.json (a randomly initialised encoder rebuilds from it)

and ``<checkpoint_dir>/latest`` names the newest complete one. Save order: every piece into ``.tmp-step_...``,
fsync, rename the folder, then replace ``latest`` atomically; a process killed at any moment leaves ``latest``
naming a complete checkpoint. Multi-node runs need ``checkpoint_dir`` on a shared filesystem.

With ``background`` (the trainer's default) rank 0 copies what it writes to the CPU during ``save()`` (into buffers
kept between saves, ``CpuStaging``) and writes it in a thread while the training goes on; the next ``save()`` (or
``wait()``) waits for it first.

Everything is read back with safetensors or ``torch.load(weights_only=True)``. Rebuilding a model for inference
from a checkpoint is ``loravl.loading``'s work.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from .text import CaptionTokenizer

if TYPE_CHECKING:  # the model is only handed in: checkpoints do not build models (loravl.loading does)
    from .model import VisionLanguageModel

logger = logging.getLogger(__name__)

LATEST = "latest"
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.json"
EXPORT_MARKER = "loravl_export.json"
# Fault injection for the crash-during-save test: "STEP:SECONDS" sleeps after that step's pieces are written,
# before the rename.
SLOW_SAVE_ENV = "LORAVL_TEST_SLOW_SAVE"
# The same before any of the shared pieces is written (the background-save test changes the state meanwhile).
DELAYED_WRITE_ENV = "LORAVL_TEST_DELAYED_WRITE"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainState:
    """Where the run is. ``epoch`` is the epoch in progress; ``step_in_epoch`` optimizer steps of it are done
    (0: it starts fresh, so the data loader starts the epoch from the beginning)."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    lora_unfrozen: bool = False

    @property
    def phase(self) -> int:
        return 2 if self.lora_unfrozen else 1

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


class RNGState:
    """This process' random generators: torch CPU, every CUDA device, numpy, python."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's state as plain tensors/ints, so weights_only loading accepts it
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": list(random.getstate()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


# Model weights


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (``text.lm_head.weight`` is ``text.transformer.wte.weight``):
    keep the first name of each (detached, where it is), and return the others as aliases {dropped: kept}."""
    kept: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() > 0 and key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        out[name] = tensor.detach()
    return out, aliases


class CpuStaging:
    """The CPU copies a background save writes, into buffers kept from one save to the next (page-locked for GPU
    tensors, so the copies run at the bus's rate without a sync each): allocating and faulting in new memory at
    every save cost more than the copy itself (BENCHMARKS.md, checkpoint row; the first save still allocates).

    A save may reuse the buffers only once the write of the one before is done: ``Checkpointer.save`` waits for it
    before copying. What the training does to its own tensors afterwards leaves the copies as they were."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, torch.Tensor] = {}
        self._devices: set[torch.device] = set()

    def copy(self, state: Any, key: tuple = ()) -> Any:
        """``state`` (nested dicts, lists and tuples) with every tensor copied; ``key`` names the piece (buffers
        are kept by the path to each tensor)."""
        if isinstance(state, torch.Tensor):
            return self._copy_tensor(key, state.detach())
        if isinstance(state, dict):
            return {k: self.copy(v, (*key, k)) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self.copy(v, (*key, i)) for i, v in enumerate(state))
        return state

    def _copy_tensor(self, key: tuple, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        self._used[key] = buffer
        if tensor.is_cuda:
            self._devices.add(tensor.device)
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer

    def finish(self) -> None:
        """After the save's copies: waits for those from a GPU, and lets go of the buffers this save did not use
        (a tensor that changed shape, or a piece gone)."""
        for device in self._devices:
            torch.cuda.synchronize(device)
        self._buffers, self._used, self._devices = self._used, {}, set()


def cpu_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``write_weights`` takes: the tensors on the CPU (not copied where they are there already), and the
    aliases of tied ones."""
    tensors, aliases = _dedupe_shared(state)
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}, aliases


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    write_weights(*cpu_weights(state), path)


def write_weights(tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A file written by ``save_weights``, aliases (tied weights) restored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    for dropped, kept in aliases.items():
        state[dropped] = state[kept]
    return state


def load_weights_into(model: VisionLanguageModel, state: dict[str, torch.Tensor],
                      allowed_missing: set[str]) -> None:
    """``load_state_dict`` that fails on unexpected keys and on missing keys outside ``allowed_missing``."""
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - allowed_missing
    if result.unexpected_keys or missing:
        raise RuntimeError(f"checkpoint does not match the model: unexpected keys {sorted(result.unexpected_keys)[:5]}"
                           f", missing keys {sorted(missing)[:5]}")


def frozen_keys(model: VisionLanguageModel) -> set[str]:
    """Keys a checkpoint leaves out: they come back from ``model.vision.pretrained``."""
    return set(model.state_dict()) - set(model.checkpoint_state_dict())


class ModelWeights:
    """The model as a checkpoint piece, in safetensors."""

    def __init__(self, model: VisionLanguageModel):
        self.model = model

    def save(self, path: Path) -> None:
        save_weights(self.model.checkpoint_state_dict(), path)

    def snapshot(self, staging: CpuStaging | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The checkpoint's tensors on the CPU and the aliases of tied ones (``write_weights`` takes them). With
        ``staging``, copies of them: the training may then change its own tensors without changing these."""
        if staging is None:
            return cpu_weights(self.model.checkpoint_state_dict())
        tensors, aliases = _dedupe_shared(self.model.checkpoint_state_dict())
        return staging.copy(tensors, ("model",)), aliases

    def load(self, path: Path) -> None:
        load_weights_into(self.model, read_weights(path), frozen_keys(self.model))


# Saving and loading a training checkpoint


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _sleep_if_asked(variable: str, step: int) -> None:
    """Fault injection for the tests: ``variable`` set to "STEP:SECONDS" sleeps that long when saving that step."""
    slow_step, _, seconds = os.environ.get(variable, "").partition(":")
    if slow_step and int(slow_step) == step:
        time.sleep(float(seconds))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders are never named ``step_*``)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint dir whose ``latest`` pointer names one."""
    path = Path(path)
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if not target.is_dir():
            raise FileNotFoundError(f"{pointer} names {target.name}, which does not exist")
        return target
    if (path / TRAIN_STATE_FILE).is_file() or (path / EXPORT_MARKER).is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a checkpoint, an export nor a checkpoint dir with a 'latest' file")


class Checkpointer:
    """Saves and restores the run as named pieces. ``shared`` pieces are the same on every rank and written by
    rank 0; ``per_rank`` pieces are written by each rank into ``rank_<r>.pt``."""

    def __init__(self, directory: str | Path, keep_last: int, rank: int, world_size: int, background: bool = False):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.background = background
        self._staging = CpuStaging()
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    def save(self, step: int, model: ModelWeights, shared: dict[str, Stateful], per_rank: dict[str, Stateful],
             train_state: TrainState, run_config: dict[str, Any], tokenizer: CaptionTokenizer) -> Path:
        """Collective: every rank calls it. Returns the new checkpoint folder: complete on return, or with
        ``background`` once rank 0's thread is done (``wait()``). Each rank's own piece is written before it
        returns either way (it is small); rank 0 copies the shared pieces to the CPU first, so the steps after
        ``save()`` do not change what is written."""
        self.wait()  # one write at a time, in step order; the staging buffers are free again after it
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
            tmp.mkdir()
        _barrier()
        torch.save({name: piece.state_dict() for name, piece in per_rank.items()}, tmp / f"rank_{self.rank}.pt")
        _fsync(tmp / f"rank_{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            # Written while the training goes on (background): copies. Written now: the tensors as they are.
            if self.background:
                weights = model.snapshot(self._staging)
                pieces = {name: self._staging.copy(piece.state_dict(), (name,)) for name, piece in shared.items()}
                self._staging.finish()
            else:
                weights = model.snapshot()
                pieces = {name: piece.state_dict() for name, piece in shared.items()}
            vision_config = model.model.vision.model.get_base_model().config
            args = (step, tmp, final, weights, pieces, train_state.state_dict(), run_config, tokenizer, vision_config)
            if self.background:
                self._writer = threading.Thread(target=self._write_catching, args=args, name="loravl-checkpoint")
                self._writer.start()
            else:
                self._write(*args)
        if not self.background:
            _barrier()
        return final

    def wait(self) -> None:
        """Until the background write, if one runs, is done; raises if it failed (the folder it was writing is
        left as ``.tmp-step_...``, and ``latest`` names the checkpoint before it)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise RuntimeError(f"writing a checkpoint into {self.directory} failed: {error}") from error

    def _write_catching(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # raised on the training thread by wait()
            logger.error("Writing a checkpoint failed: %s: %s", type(e).__name__, e)
            self._write_error = e

    def _write(self, step: int, tmp: Path, final: Path, weights: tuple, pieces: dict[str, Any],
               train_state: dict[str, Any], run_config: dict[str, Any], tokenizer: CaptionTokenizer, vision_config) -> None:
        """Rank 0: the shared pieces into ``tmp``, fsync, rename to ``final``, then ``latest`` moves."""
        _sleep_if_asked(DELAYED_WRITE_ENV, step)
        write_weights(*weights, tmp / MODEL_FILE)
        for name, state in pieces.items():
            torch.save(state, tmp / f"{name}.pt")
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        tokenizer.save(tmp / "tokenizer")
        vision_config.save_pretrained(str(tmp / "vision_config"))
        _fsync_tree(tmp)
        _sleep_if_asked(SLOW_SAVE_ENV, step)
        if final.exists():  # the same step saved again (e.g. a rerun): the older copy goes
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.directory)
        pointer_tmp = self.directory / f"{TMP_PREFIX}{LATEST}"
        pointer_tmp.write_text(final.name + "\n")
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, self.directory / LATEST)  # the pointer moves last
        _fsync(self.directory)
        self._prune(final)
        logger.info("Saved checkpoint %s", final)

    def _prune(self, newest: Path) -> None:
        for old in list_checkpoints(self.directory)[: -self.keep_last]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, model: ModelWeights, shared: dict[str, Stateful],
             per_rank: dict[str, Stateful], train_state: TrainState) -> Path:
        """Restore every piece present in ``shared``/``per_rank`` (build them for the saved phase first)."""
        folder = resolve_checkpoint(path)
        model.load(folder / MODEL_FILE)
        for name, piece in shared.items():
            piece.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True, map_location="cpu"))
        rank_file = folder / f"rank_{self.rank}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} missing: resume with the world size the checkpoint was saved with")
        rank_state = torch.load(rank_file, weights_only=True, map_location="cpu")
        for name, piece in per_rank.items():
            try:
                piece.load_state_dict(rank_state[name])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{rank_file}: its {name!r} state cannot be restored: {e}") from e
        train_state.load_state_dict(json.loads((folder / TRAIN_STATE_FILE).read_text()))
        return folder


def read_train_state(path: str | Path) -> TrainState:
    state = TrainState()
    state.load_state_dict(json.loads((resolve_checkpoint(path) / TRAIN_STATE_FILE).read_text()))
    return state
