"""The trainer's optimizer and schedules: AdamW parameter groups (LoRA in its own, at ``train.lora_lr``), a linear
warmup into a cosine decay, and how many steps the run and the distillation ramp take."""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import ConfigError, LossConfig, TrainConfig
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


# How long the schedules run


def count_steps_per_epoch(loader: Any, grad_accum_steps: int) -> Optional[int]:
    try:
        return math.ceil(len(loader) / grad_accum_steps)
    except TypeError:
        return None  # streaming: no epoch length


def distill_ramp_steps(loss: LossConfig, steps_per_epoch: Optional[int]) -> int:
    """Steps over which momentum distillation ramps in: the configured count, else the first epoch."""
    if loss.distill_alpha_ramp_steps is not None:
        return loss.distill_alpha_ramp_steps
    if steps_per_epoch is None and loss.distill_alpha > 0:
        raise ConfigError("model.loss.distill_alpha_ramp_steps must be set for streaming data (it has no epoch)")
    return steps_per_epoch or 0


def count_total_steps(tc: TrainConfig, steps_per_epoch: Optional[int]) -> int:
    if steps_per_epoch is None:
        if tc.max_steps is None:
            raise ConfigError("train.max_steps must be set for streaming data (it has no epoch length)")
        return tc.max_steps
    if steps_per_epoch == 0:
        raise ConfigError("the training set is smaller than one batch per process (train.batch_size)")
    total = steps_per_epoch * tc.epochs
    return min(total, tc.max_steps) if tc.max_steps is not None else total
