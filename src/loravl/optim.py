"""The trainer's optimizer and schedule: AdamW parameter groups (LoRA in its own, at ``train.lora_lr``) and a linear
warmup into a cosine decay."""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig
from .model import VisionLanguageModel


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, gates and the temperature (all < 2-D) get no weight decay."""
    return param.ndim < 2


def build_optimizer(model: VisionLanguageModel, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over what trains now: decayed matrices, undecayed vectors/scalars, and LoRA when it trains."""
    decay, no_decay = [], []
    for name, p in model.trainable_parameters():
        if "lora_" in name:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "lr": tc.lr, "initial_lr": tc.lr, "weight_decay": tc.weight_decay, "name": "decay"},
        {"params": no_decay, "lr": tc.lr, "initial_lr": tc.lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if model.vision.lora_trainable:
        groups.append(lora_param_group(model, tc))
    # fused: one kernel per step on CUDA, and it can skip a non-finite step on the device (found_inf).
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


def lora_param_group(model: VisionLanguageModel, tc: TrainConfig) -> dict[str, Any]:
    return {"params": [p for _, p in model.lora_parameters()], "lr": tc.lora_lr, "initial_lr": tc.lora_lr,
            "weight_decay": tc.weight_decay, "name": "lora"}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio``; ``step`` = optimizer steps already taken."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int,
                    steps_done: int) -> LambdaLR:
    """The schedule positioned after ``steps_done`` steps (every group has ``initial_lr``)."""
    schedule = functools.partial(lr_multiplier, warmup_steps=tc.warmup_steps, total_steps=total_steps,
                                 min_lr_ratio=tc.min_lr_ratio)
    return LambdaLR(optimizer, schedule, last_epoch=steps_done - 1)


def apply_learning_rates(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int,
                         steps_done: int) -> LambdaLR:
    """A resumed run's ``train.lr`` / ``train.lora_lr`` put into the restored optimizer's groups (which carry the
    rates they were saved with), and the schedule positioned anew on them."""
    for group in optimizer.param_groups:
        group["initial_lr"] = tc.lora_lr if group.get("name") == "lora" else tc.lr
    return build_scheduler(optimizer, tc, total_steps, steps_done)
