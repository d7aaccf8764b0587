"""The model's weights as a checkpoint piece: safetensors files (tied weights stored once), and the CPU copies a
background save writes from, kept from one save to the next."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # the model is only handed in: checkpoints do not build models (loravl.loading does)
    from .model import VisionLanguageModel


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


# State that checkpoints of earlier releases lack.
ADDED_SINCE = {"queue.caption_ids"}


def load_weights_into(model: VisionLanguageModel, state: dict[str, torch.Tensor],
                      allowed_missing: set[str]) -> None:
    """``load_state_dict`` that fails on unexpected keys and on missing keys outside ``allowed_missing``."""
    result = model.load_state_dict(state, strict=False)
    # Saved before these existed: their initial values hold (the queue's caption ids: unknown, matching nothing).
    missing = set(result.missing_keys) - allowed_missing - ADDED_SINCE
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
