"""Training checkpoints: a set of stateful pieces written to a temporary folder and renamed into place.

A checkpoint folder ``<train.checkpoint.dir>/step_00001000/`` holds

    model.safetensors      model.checkpoint_state_dict() (trainable, LoRA, momentum copies, ITC queue)
    optimizer.pt           AdamW state and param groups (the same on every rank)
    scheduler.pt           the LR schedule's position
    scaler.pt              the fp16 grad scaler (only when one is used)
    train_state.json       epoch, step, phase (TrainState)
    rank_<r>.pt            per rank: RNG states (torch, cuda, numpy, python) and the data loader's position
    config.yaml            the resolved RunConfig (``RunConfig.to_dict()``)
    tokenizer/             the caption tokenizer
    vision_config/         the backbone's HF config.json (a randomly initialised encoder rebuilds from it)

and ``<train.checkpoint.dir>/latest`` names the newest complete one. Save order: every piece into ``.tmp-step_...``,
fsync, rename the folder, then replace ``latest`` atomically; a process killed at any moment leaves ``latest``
naming a complete checkpoint. Multi-node runs need ``train.checkpoint.dir`` on a shared filesystem.

With ``background`` (the trainer's default) rank 0 copies what it writes to the CPU during ``save()`` (into buffers
kept between saves, ``CpuStaging``) and writes it in a thread while the training goes on; the next ``save()`` (or
``wait()``) waits for it first.

Everything is read back with safetensors or ``torch.load(weights_only=True)``, after the files are checked against
the checksums written with them (``loravl.integrity``). The model's weights as a piece are ``loravl.weights``;
rebuilding a model for inference from a checkpoint is ``loravl.loading``'s work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .integrity import (
    CheckpointError,
    explain_write_failure,
    non_finite_tensors,
    state_bytes,
    verify,
    write_manifest,
    write_rank_digest,
)
from .text import CaptionTokenizer
from .weights import CpuStaging, ModelWeights, write_weights

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
        shared_states = {name: piece.state_dict() for name, piece in shared.items()}
        # Every rank checks its replica (they are the same), so all of them stop here together.
        bad = non_finite_tensors({"model": model.model.checkpoint_state_dict(), **shared_states})
        if bad:
            raise FloatingPointError(f"not saving step {step}: non-finite values in {', '.join(bad)}; the last "
                                     f"checkpoint in {self.directory} is kept")
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
            tmp.mkdir()
        _barrier()
        rank_file = tmp / f"rank_{self.rank}.pt"
        torch.save({name: piece.state_dict() for name, piece in per_rank.items()}, rank_file)
        write_rank_digest(rank_file)
        _fsync(rank_file)
        _barrier()
        if self.rank == 0:
            # Written while the training goes on (background): copies. Written now: the tensors as they are.
            if self.background:
                weights = model.snapshot(self._staging)
                pieces = {name: self._staging.copy(state, (name,)) for name, state in shared_states.items()}
                self._staging.finish()
            else:
                weights = model.snapshot()
                pieces = shared_states
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
               train_state: dict[str, Any], run_config: dict[str, Any], tokenizer: CaptionTokenizer,
               vision_config) -> None:
        """Rank 0: the shared pieces into ``tmp`` with their checksums, fsync, rename to ``final``, then ``latest``
        moves. A failed write removes ``tmp`` (a full disk gets its space back) and leaves ``latest`` as it was."""
        _sleep_if_asked(DELAYED_WRITE_ENV, step)
        try:
            write_weights(*weights, tmp / MODEL_FILE)
            for name, state in pieces.items():
                torch.save(state, tmp / f"{name}.pt")
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=1))
            (tmp / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
            tokenizer.save(tmp / "tokenizer")
            vision_config.save_pretrained(str(tmp / "vision_config"))
            write_manifest(tmp)
            _fsync_tree(tmp)
        except Exception as e:
            # The failed write's frames hold its open files: let them go, so a full disk gets the space back.
            e.__traceback__ = None
            gc.collect()
            shutil.rmtree(tmp, ignore_errors=True)
            raise explain_write_failure(e, final, state_bytes(weights[0]) + state_bytes(pieces)) from None
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
             per_rank: dict[str, Stateful], train_state: TrainState, verified: bool = False) -> Path:
        """Restore every piece present in ``shared``/``per_rank`` (build them for the saved phase first), after
        checking the files against their checksums (``verified``: ``find_start`` has). Raises ``CheckpointError``
        naming the folder and the piece."""
        folder = resolve_checkpoint(path)
        if not verified and not verify(folder):
            logger.info("%s has no checksums (written by an earlier loravl): loaded unverified", folder)
        with _naming(folder, MODEL_FILE):
            model.load(folder / MODEL_FILE)
        for name, piece in shared.items():
            with _naming(folder, f"{name}.pt"):
                piece.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True, map_location="cpu"))
        rank_file = folder / f"rank_{self.rank}.pt"
        if per_rank and not rank_file.is_file():
            raise CheckpointError(f"{rank_file} missing: resume with the world size the checkpoint was saved with")
        if per_rank:
            with _naming(folder, rank_file.name):
                rank_state = torch.load(rank_file, weights_only=True, map_location="cpu")
        for name, piece in per_rank.items():
            try:
                piece.load_state_dict(rank_state[name])
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{rank_file}: its {name!r} state cannot be restored: {e}") from e
        train_state.load_state_dict(read_train_state(folder).state_dict())
        return folder


@contextlib.contextmanager
def _naming(folder: Path, piece: str) -> Iterator[None]:
    """Library errors from reading one piece (safetensors, torch.load, json) as a ``CheckpointError`` that names it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{folder}: {piece} cannot be read: {type(e).__name__}: {e}") from e


def newest_usable_checkpoint(directory: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """For ``--resume latest``: the checkpoint ``latest`` names if it verifies, else the newest that does; and the
    ones passed over, each with why. (None, ...) when the folder holds no checkpoint at all."""
    skipped: list[tuple[str, str]] = []
    candidates = list(reversed(list_checkpoints(directory)))
    pointer = directory / LATEST
    if pointer.is_file():
        try:
            text = pointer.read_text().strip()
            named = directory / text if text else None
            if not text:
                skipped.append((LATEST, "empty"))
        except (OSError, UnicodeDecodeError) as e:
            named = None
            skipped.append((LATEST, f"unreadable ({type(e).__name__})"))
        if named is not None and named.parent == directory and named.is_dir():
            candidates = [named, *(c for c in candidates if c != named)]
        elif named is not None:
            skipped.append((LATEST, f"names {named.name!r}, which is not a checkpoint folder here"))
    for folder in candidates:
        try:
            verify(folder)
            read_train_state(folder)
            return folder, skipped
        except CheckpointError as e:
            skipped.append((folder.name, str(e)))
    return None, skipped


def find_start(directory: Path, resume: str, overwrite: bool, rank: int) -> Path | None:
    """Where the run starts: None for a fresh start, else the checkpoint to resume from, its files verified.

    ``resume`` latest: the newest checkpoint that verifies (those passed over are logged with why); none at all,
    a fresh start. A folder: that one, verified. Empty: a fresh start, refused where ``directory`` already holds a
    run (the newcomer who runs the demo twice), unless ``overwrite``, which deletes that run's checkpoints first.
    Collective under several processes (rank 0 deletes, the others wait)."""
    from .config import ConfigError

    if not resume:
        held = list_checkpoints(directory)
        if held and not overwrite:
            raise ConfigError(
                f"{directory} already holds a run ({len(held)} checkpoint(s), the newest {held[-1].name}). Resume "
                f"it with --resume latest, train into another folder with --train.checkpoint.dir, or start over "
                f"there with --train.overwrite true (deletes its checkpoints)")
        if held or (directory / LATEST).exists():
            if rank == 0:
                for folder in [*held, directory / "tokenizer"]:
                    shutil.rmtree(folder, ignore_errors=True)
                (directory / LATEST).unlink(missing_ok=True)
                logger.info("train.overwrite: deleted %d checkpoint(s) of the run in %s", len(held), directory)
            _barrier()
        return None
    if resume == LATEST:
        folder, skipped = newest_usable_checkpoint(directory)
        for name, why in skipped:
            logger.warning("Resume: passed over %s: %s", name, why)
        if folder is None and skipped:
            raise CheckpointError(f"--resume latest: no usable checkpoint in {directory} ("
                                  + "; ".join(f"{name}: {why}" for name, why in skipped) + ")")
        if folder is None:
            logger.info("No checkpoint in %s yet: starting fresh", directory)
        return folder
    try:
        folder = resolve_checkpoint(resume)
    except FileNotFoundError as e:
        raise ConfigError(f"train.resume: {e}") from None
    verify(folder)
    return folder


def read_train_state(path: str | Path) -> TrainState:
    folder = resolve_checkpoint(path)
    state = TrainState()
    with _naming(folder, TRAIN_STATE_FILE):
        state.load_state_dict(json.loads((folder / TRAIN_STATE_FILE).read_text()))
    return state
