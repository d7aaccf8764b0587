"""Which device, and which precision on it: one place for the trainer, captioning, evaluation and fine-tuning."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config_parsing import ConfigError


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``None``/"auto": the GPU when there is one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
    return device


@dataclass
class Precision:
    name: str
    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state)


def choose_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs that have it, fp16 (with a grad scaler) on older GPUs, fp32 on CPU."""
    if setting == "auto":
        if device.type == "cuda":
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            setting = "no"
    if setting == "no":
        return Precision("fp32", None, None)
    if setting == "bf16":
        return Precision("bf16", torch.bfloat16, None)
    if device.type != "cuda":
        raise ConfigError("train.mixed_precision fp16 needs a GPU")
    return Precision("fp16", torch.float16, torch.amp.GradScaler("cuda"))


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Inference and fine-tuning: bf16 autocast on GPUs that have it (fp16 would need the loss scaling only the
    trainer has), fp32 elsewhere."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_precision("bf16" if bf16 else "no", device).autocast(device)
