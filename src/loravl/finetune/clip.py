"""CLIP's vision transformer as a fine-tuning backbone, built with open_clip (the package CLIP users already have).

``--backbone`` names it: ``clip_vit_b32`` / ``clip_vit_b16`` (open_clip's ViT-B-32 / ViT-B-16), or
``clip:<open_clip model name>`` / ``clip:<model config .json>`` for any other (a tiny one in the tests). Weights:
random with ``--random-init``, a local file with ``--weights`` (an open_clip or OpenAI checkpoint), otherwise
open_clip's ``openai`` weights from the hub, which needs the network.

Its blocks use ``nn.MultiheadAttention``: q, k and v come from one packed ``in_proj`` weight, which PEFT adapts
with ``out_proj`` as one LoRA layer (``loravl.lora``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..config import ConfigError

CLIP_BACKBONES = {"clip_vit_b32": "ViT-B-32", "clip_vit_b16": "ViT-B-16"}
# CLIP's own input normalisation (open_clip's OPENAI_DATASET_MEAN/STD), not ImageNet's.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def is_clip_backbone(spec: str) -> bool:
    return spec in CLIP_BACKBONES or spec.startswith("clip:")


def _model_name(spec: str) -> str:
    import open_clip

    name = CLIP_BACKBONES.get(spec, spec.removeprefix("clip:"))
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"--backbone {spec}: no model config file {path}")
        settings = json.loads(path.read_text())
        if "vision_cfg" not in settings:
            raise ConfigError(f"--backbone {spec}: {path} is no open_clip model config (it has no 'vision_cfg')")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ConfigError(f"--backbone {spec}: open_clip has no model {name!r}")
    return name


class ClipVitTokens(nn.Module):
    """open_clip's ``VisionTransformer`` returning every token after its final LayerNorm, as
    ``.last_hidden_state`` [B, 1 + patches, width] (the class token first), the shape DINOv2 gives."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        visual.proj = None  # the projection into CLIP's joint space: a classifier reads the tokens, not it
        self.visual = visual
        self.hidden_size = visual.transformer.width
        self.patch_size = visual.conv1.kernel_size[0]
        self.num_prefix_tokens = 1

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        v = self.visual
        tokens = v.transformer(v._embeds(pixel_values))  # _embeds: patches, class token, positions, ln_pre
        return BaseModelOutput(last_hidden_state=v.ln_post(tokens))


def create_clip_vit(spec: str, random_init: bool = False, weights: Optional[str] = None,
                    image_size: Optional[int] = None) -> ClipVitTokens:
    import open_clip

    name = _model_name(spec)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"--weights {weights}: no such file")
    pretrained = None if random_init else (weights or "openai")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, force_image_size=image_size)
    except Exception as e:  # noqa: BLE001 - a failed download or a checkpoint of another model, said plainly
        raise ConfigError(f"--backbone {spec}: cannot load weights {pretrained!r} ({type(e).__name__}: {e}); "
                          f"give a local file with --weights, or --random-init") from e
    return ClipVitTokens(model.visual)
