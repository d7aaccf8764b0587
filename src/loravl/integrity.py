"""Whether a checkpoint folder is what was written: every file's SHA-256 recorded at save time and checked at load,
non-finite tensors refused before they are saved, and errors that name the checkpoint and the piece.

Rank 0 writes ``checksums.json`` over the shared files (weights, optimizer, schedule, state, config, tokenizer);
each rank writes ``rank_<r>.pt.sha256`` beside its own piece. A checkpoint written before checksums existed has
neither, and loads unverified (said in the log).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

MANIFEST_FILE = "checksums.json"
RANK_DIGEST_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder and the piece."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, exclude: Iterable[str] = ()) -> None:
    """``checksums.json`` over every file in ``folder`` (sub-folders too) but the per-rank pieces and ``exclude``."""
    skipped = set(exclude)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in skipped or name.startswith("rank_") or name == MANIFEST_FILE:
            continue
        files[name] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    partial = folder / f".{MANIFEST_FILE}.partial"  # present under its name only when complete
    partial.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    os.replace(partial, folder / MANIFEST_FILE)


def write_rank_digest(path: Path) -> None:
    path.with_name(path.name + RANK_DIGEST_SUFFIX).write_text(file_digest(path) + "\n")


def verify(folder: Path) -> bool:
    """Raise ``CheckpointError`` naming the first file that is missing, truncated or changed since it was written
    (the shared files, and every rank's piece that has its checksum beside it). Returns False for a checkpoint
    written without checksums (nothing to check against), True when verified."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder}: {MANIFEST_FILE} is damaged ({type(e).__name__}: {e})") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{folder}: {name} is {size} bytes, {expected['bytes']} were written (truncated "
                                  f"or replaced)")
        if file_digest(path) != expected["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match the checksum written with it (damaged)")
    for digest in sorted(folder.glob(f"rank_*.pt{RANK_DIGEST_SUFFIX}")):
        piece = digest.with_name(digest.name[: -len(RANK_DIGEST_SUFFIX)])
        if not piece.is_file():
            raise CheckpointError(f"{folder}: {piece.name} is missing")
        if file_digest(piece) != digest.read_text().strip():
            raise CheckpointError(f"{folder}: {piece.name} does not match the checksum written with it (damaged)")
    return True


def saved_world_size(folder: Path) -> int:
    """How many processes wrote the checkpoint: one rank piece each."""
    return len(list(folder.glob("rank_*.pt")))


@torch.no_grad()
def non_finite_tensors(named_states: dict[str, Any], limit: int = 5) -> list[str]:
    """Names (``piece/key``) of floating-point tensors with NaN or inf in the given state dicts, at most ``limit``.
    One host sync for all of them."""
    names, flags = [], []

    def walk(state: Any, prefix: str) -> None:
        if isinstance(state, torch.Tensor):
            if state.is_floating_point() and state.numel():
                names.append(prefix)
                flags.append(torch.isfinite(state).all())
        elif isinstance(state, dict):
            for k, v in state.items():
                walk(v, f"{prefix}/{k}")
        elif isinstance(state, (list, tuple)):
            for i, v in enumerate(state):
                walk(v, f"{prefix}/{i}")

    for piece, state in named_states.items():
        walk(state, piece)
    if not flags:
        return []
    finite = torch.stack([f.to("cpu") for f in flags]).tolist()
    return [name for name, ok in zip(names, finite) if not ok][:limit]


def state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def explain_write_failure(error: BaseException, folder: Path, needed_bytes: int) -> BaseException:
    """A failed checkpoint write as the error to raise: told plainly where the disk is full (torch.save reports
    that as "unexpected pos ..."); other errors as they are."""
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or free < needed_bytes
    if not full:
        return error
    return OSError(errno.ENOSPC, f"disk full: the checkpoint needs about {needed_bytes / 2**20:.0f} MiB in "
                                 f"{folder.parent}, {free / 2**20:.0f} MiB are free ({type(error).__name__}: "
                                 f"{error}); the previous checkpoint is kept")
