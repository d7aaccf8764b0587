"""ConvLoRA for timm's FastViT: PEFT's Conv2d LoRA on every dense convolution of the chosen stages.

Which convolutions count as "dense": ``nn.Conv2d`` with ``groups == 1`` under ``stages.{i}``. In FastViT those are
  - ``blocks.*.mlp.fc1`` / ``fc2``: the 1x1 expansion/projection convs of every ConvMlp (the channel MLP), and
  - ``downsample.proj.1.conv_kxk.0.conv``: the 1x1 branch conv of the MobileOneBlock in each PatchEmbed (stages 1-3).
Everything else in the stages is depthwise (groups == channels): RepMixer's 3x3 mixers, the 7x7 ConvMlp conv, the
ReparamLargeKernelConv 7x7/3x3 downsamplers and the 1x1 ``conv_scale`` branches. A rank-r down/up factorisation of
a depthwise kernel saves nothing (each output channel sees one input channel), so they stay frozen. The stem
(dense, outside the stages) joins only with ``include_stem=True``; ``final_conv`` (depthwise + SE) never does.
FastViT-SA's attention projections are ``nn.Linear``, not convolutions, and are not adapted here.

PEFT's ``lora.Conv2d`` is the ConvLoRA side path: ``lora_A`` is a conv with the base layer's kernel size, stride
and padding down to r channels, ``lora_B`` a 1x1 conv up to the output channels, initialised to zero, the sum
scaled by alpha / r.

BatchNorm: the backbone is frozen, so its BatchNorm layers must not update their running statistics (or
normalise with batch statistics) in train mode; ``freeze_batchnorm`` puts them back in eval mode after every
``train()``.

Reparameterisation order: timm's ``reparameterize()`` fuses a MobileOneBlock's branch convs and BatchNorms into
one conv by reading ``conv.weight``. On a PEFT-wrapped conv that is the *base* weight only, so reparameterising
before merging silently drops the LoRA update. ``merge_and_reparameterize`` merges first, then reparameterises.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

import timm
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from timm.models.fastvit import FastVit
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .config import ConfigError, LoraConfig, VisionConfig
from .lora import InjectionSummary, injection_summary

FASTVIT_STAGES = (0, 1, 2, 3)


def is_fastvit_backbone(name: str) -> bool:
    return name.startswith("fastvit_")


def find_fastvit(model: nn.Module) -> tuple[str, FastVit]:
    """The FastVit inside ``model`` (or ``model`` itself) and its module-name prefix ('' for the model itself)."""
    for name, module in model.named_modules():
        if isinstance(module, FastVit):
            return (name + "." if name else ""), module
    raise ValueError(f"{type(model).__name__} contains no timm FastVit")


def dense_conv_names(model: nn.Module, stages: Iterable[int] = FASTVIT_STAGES,
                     include_stem: bool = False) -> list[str]:
    """Full module names (relative to ``model``) of the groups == 1 Conv2d layers in the chosen stages."""
    prefix, fastvit = find_fastvit(model)
    stages = sorted(set(stages))
    bad = [s for s in stages if not 0 <= s < len(fastvit.stages)]
    if bad:
        raise ValueError(f"FastViT stages {bad} do not exist (it has {len(fastvit.stages)}: 0..{len(fastvit.stages) - 1})")
    roots = [f"stages.{s}." for s in stages] + (["stem."] if include_stem else [])
    return [
        prefix + name for name, module in fastvit.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1 and name.startswith(tuple(roots))
    ]


def apply_lora_to_fastvit(model: nn.Module, r: int = 16, alpha: int = 16,
                          stages: Iterable[int] = FASTVIT_STAGES, dropout: float = 0.0,
                          include_stem: bool = False) -> PeftModel:
    """Freeze ``model`` (a FastVit or a module holding one) and put PEFT Conv2d LoRA on its dense stage convs.

    Returns the PeftModel; LoRA parameters are trainable, everything else frozen. Prints the injection summary.
    """
    names = dense_conv_names(model, stages, include_stem)
    if not names:
        raise ValueError(f"no dense Conv2d in FastViT stages {tuple(stages)}")
    model.requires_grad_(False)
    # Exact full names: PEFT matches a list entry against the whole module name (or a '.'-suffix of it).
    peft_model = get_peft_model(
        model, PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none"))
    print(fastvit_injection_summary(peft_model, r, alpha).format())
    return peft_model


def fastvit_injection_summary(peft_model: nn.Module, r: int, alpha: int) -> InjectionSummary:
    return injection_summary(peft_model, LoraConfig(rank=r, alpha=alpha))


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode: a frozen backbone keeps its running statistics and uses them in training."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def merge_and_reparameterize(peft_model: PeftModel) -> nn.Module:
    """Fold LoRA into the base convs (PEFT), then fuse FastViT's branches (timm). In this order; see module doc."""
    merged = peft_model.merge_and_unload()
    return timm.utils.reparameterize_model(merged, inplace=True)


def feature_map_size(fastvit: FastVit, image_size: int) -> int:
    """Side of the last feature map: every stride-2 layer in FastViT pads so that it maps n to ceil(n / 2)."""
    halvings = int(math.log2(fastvit.feature_info[-1]["reduction"]))
    side = image_size
    for _ in range(halvings):
        side = (side + 1) // 2
    return side


class FastVitTokens(nn.Module):
    """A FastViT seen as a token encoder: the last feature map ``[B, C, H, W]`` as ``H*W`` tokens, with the
    spatial mean placed first in the CLS role. Returns what a transformers vision model returns
    (``.last_hidden_state`` of shape ``[B, 1 + H*W, C]``), so it drops into VisionEncoder's PEFT path."""

    num_prefix_tokens = 1

    def __init__(self, fastvit: FastVit):
        super().__init__()
        self.fastvit = fastvit
        self.hidden_size: int = fastvit.num_features

    def num_tokens(self, image_size: int) -> int:
        return self.num_prefix_tokens + feature_map_size(self.fastvit, image_size) ** 2

    def train(self, mode: bool = True) -> "FastVitTokens":
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        feature_map = self.fastvit.forward_features(pixel_values)  # after final_conv: [B, num_features, H, W]
        patches = feature_map.flatten(2).transpose(1, 2)
        tokens = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)
        return BaseModelOutput(last_hidden_state=tokens)


def create_fastvit(name: str, random_init: bool, weights_file: Optional[str] = None) -> FastVit:
    """A timm FastViT: random weights, a local weights file, or timm's own pretrained weights (downloaded by timm)."""
    try:
        if random_init:
            model = timm.create_model(name, pretrained=False)
        elif weights_file:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights_file})
        else:
            model = timm.create_model(name, pretrained=True)
    except RuntimeError as e:  # timm raises RuntimeError for an unknown model name
        raise ConfigError(f"model.vision.backbone: cannot create {name!r} with timm: {e}") from e
    if not isinstance(model, FastVit):
        raise ConfigError(f"model.vision.backbone: {name!r} is a {type(model).__name__}, not a timm FastVit")
    return model


def build_fastvit_encoder(cfg: VisionConfig) -> PeftModel:
    """VisionEncoder's FastViT path: ``FastVitTokens`` with LoRA on the dense convs of ``cfg.lora.stages``.

    ``cfg.lora.target_modules`` does not apply (FastViT has no query/value layers); ``cfg.pretrained`` is read
    only when it names an existing weights file.
    """
    weights_file = cfg.pretrained if Path(cfg.pretrained).is_file() else None
    tokens = FastVitTokens(create_fastvit(cfg.backbone, cfg.random_init, weights_file))
    names = dense_conv_names(tokens, cfg.lora.stages)
    tokens.requires_grad_(False)
    return get_peft_model(tokens, PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                                 lora_dropout=cfg.lora.dropout, target_modules=names, bias="none"))
