"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): A frozen at its random initialisation, only B trains.

With A fixed, the best update of B for a full-weight gradient g (in the least-squares sense, ||s B' A - g||) is
B's own gradient preconditioned by a constant r x r matrix:

    g_B <- (1 / s^2) g_B (A A^T)^-1          s = alpha / r (alpha / sqrt(r) with rsLoRA)

This is the correction PEFT's ``LoraFAOptimizer`` applies inside its ``step()``. We apply the same correction as a
gradient hook on each ``lora_B`` instead, because PEFT's optimizer
  - multiplies ``A @ A.T`` directly and fails on Conv2d LoRA (4-D A: FastViT's ConvLoRA), and
  - needs an optimizer of its own, stepped only once B has a gradient (it fails on ``B.grad is None``), which does
    not fit the trainer's phase switch (LoRA frozen in phase 1, then added to the running optimizer).
A hook on B makes LoRA-FA "freeze A, precondition B's gradient": any optimizer (the trainer's AdamW group for LoRA)
then performs LoRA-FA, and gradient accumulation, clipping, AMP scaling and DDP all see the corrected gradient
(the correction is linear, so correcting each micro-batch equals correcting their sum). tests/test_lora_fa.py checks
the result against PEFT's ``create_lorafa_optimizer`` on a Linear model.

Where the savings come from: A needs no gradient, so autograd keeps only the r-wide ``A x`` for B's gradient, not the
full-width input ``x`` (or its dropout copy) of every adapted layer; A has no gradient buffer and no Adam moments.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

# Same regulariser PEFT's LoraFAOptimizer adds before inverting A A^T.
_PINV_DELTA = 1e-8


def lora_fa_preconditioner(lora_A_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(1 / s^2) (A A^T)^-1`` as an r x r float32 matrix; a conv A ``[r, in, k, k]`` is flattened to ``[r, in*k*k]``
    (the conv LoRA update is ``B @ A`` on the flattened kernels, so the same algebra holds)."""
    a = lora_A_weight.detach().flatten(1).float()
    gram = a @ a.T + _PINV_DELTA * torch.eye(a.shape[0], device=a.device)
    return torch.linalg.pinv(gram) / (scaling ** 2)


class _BGradientCorrection:
    """A tensor hook for one lora_B weight. The preconditioner is cached and recomputed only if A's storage changes
    (a checkpoint loaded into A after construction, a move to another device)."""

    def __init__(self, lora_A_weight: torch.Tensor, scaling: float):
        self.lora_A_weight = lora_A_weight
        self.scaling = scaling
        self._key: tuple | None = None
        self._matrix: torch.Tensor | None = None

    def _preconditioner(self) -> torch.Tensor:
        a = self.lora_A_weight
        key = (a.device, a.data_ptr(), a._version)
        if key != self._key:
            self._matrix, self._key = lora_fa_preconditioner(a, self.scaling), key
        return self._matrix

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        p = self._preconditioner()
        # B is [out, r] (Linear) or [out, r, 1, 1] (Conv2d LoRA): precondition the rank dimension.
        corrected = grad.reshape(grad.shape[0], -1).float() @ p
        return corrected.reshape(grad.shape).to(grad.dtype)


def lora_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """PEFT LoRA layers (Linear or Conv) of ``model``."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "scaling"):
            yield name, module


def apply_lora_fa(model: nn.Module) -> int:
    """Turn every PEFT LoRA layer of ``model`` into LoRA-FA: freeze A, correct B's gradient. Idempotent.

    Returns the number of adapted (layer, adapter) pairs. After this, train with any optimizer over the parameters
    that require grad (A never does); ``build_lora_optimizer_param_groups`` gives the group.
    """
    count = 0
    for _, module in lora_layers(model):
        hooked = getattr(module, "_lora_fa_hooked", set())
        for adapter, lora_A in module.lora_A.items():
            if adapter in hooked or adapter not in module.lora_B:
                continue
            lora_A.weight.requires_grad_(False)
            module.lora_B[adapter].weight.register_hook(
                _BGradientCorrection(lora_A.weight, module.scaling[adapter]))
            hooked.add(adapter)
            count += 1
        module._lora_fa_hooked = hooked
    return count


def build_lora_optimizer_param_groups(named_lora_parameters: Iterable[tuple[str, nn.Parameter]], lr: float,
                                      weight_decay: float, variant: str = "lora") -> list[dict]:
    """The trainer's optimizer group for the vision LoRA parameters (e.g. ``model.lora_parameters()``).

    ``lora``: A and B. ``lora_fa``: B only (A is frozen; its gradient correction lives in a hook on B that
    ``VisionEncoder`` installs when ``lora.variant`` is ``lora_fa``).
    """
    if variant not in ("lora", "lora_fa"):
        raise ValueError(f"unknown LoRA variant {variant!r}")
    params = [p for n, p in named_lora_parameters if not (variant == "lora_fa" and ".lora_A." in n)]
    return [{"params": params, "lr": lr, "weight_decay": weight_decay}]
