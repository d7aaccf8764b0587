"""A classifier = backbone + one adapter + a linear head; which parameters train is decided here, by name.

Backbones: a DINOv2 (transformers folder or hub name), a stage-1 loravl checkpoint (its vision encoder with the
stage-1 LoRA merged in), a timm FastViT name, or a CLIP ViT built with open_clip (loravl.finetune.clip). Adapters:
  lora     PEFT LoRA on attention and MLP projections (resolved with loravl.lora.resolve_target_modules; CLIP's
           packed in_proj with out_proj as one layer); on FastViT, ConvLoRA on every dense stage conv
  lora_fa  the same layers, A frozen, B trained with LoRA-FA's gradient correction (loravl.lora_fa)
  bitfit   every bias of the backbone
  prefix   prefix tuning: learned keys and values in every attention layer (loravl.finetune.prefix)
  prompt   shallow VPT: learned tokens inserted after CLS/registers, before the patch tokens
  full     every backbone weight
  linear   nothing in the backbone
The head always trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..config import ConfigError, LoraConfig, VisionConfig
from ..fastvit import FastVitTokens, create_fastvit, dense_conv_names, is_fastvit_backbone
from ..lora_fa import apply_lora_fa
from ..lora import InjectionSummary, injection_summary, peft_lora_config, resolve_target_modules
from ..vision import load_dinov2
from .clip import create_clip_vit, is_clip_backbone
from .prefix import PrefixTuning

ADAPTERS = ("lora", "lora_fa", "bitfit", "prefix", "prompt", "full", "linear")
# Full fine-tuning moves pretrained weights, so it gets the smallest step; the head alone can take a large one.
DEFAULT_LR = {"lora": 2e-4, "lora_fa": 2e-4, "bitfit": 1e-3, "prefix": 5e-4, "prompt": 5e-4, "full": 1e-5,
              "linear": 1e-3}
# (rank, alpha). alpha = 2 r keeps the update scale alpha / r fixed, so a preset changes capacity, not step size.
LORA_PRESETS = {"simple": (8, 16), "medium": (16, 32), "complex": (32, 64)}
DEFAULT_LORA_TARGETS = ["query", "key", "value", "dense", "fc1", "fc2"]
CLIP_LORA_TARGETS = ["in_proj", "out_proj", "c_fc", "c_proj"]


@dataclass
class AdapterSummary:
    adapter: str
    adapter_params: int
    head_params: int
    total_params: int
    detail: str
    lora: Optional[InjectionSummary] = None

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.head_params

    def format(self) -> str:
        lines = [self.lora.format()] if self.lora is not None else []
        lines.append(f"adapter {self.adapter}: {self.detail}")
        lines.append(
            f"trainable: {self.trainable_params:,} of {self.total_params:,} "
            f"({100.0 * self.trainable_params / max(self.total_params, 1):.3f}%): adapter {self.adapter_params:,}, "
            f"head {self.head_params:,}")
        return "\n".join(lines)


class PromptTokens(nn.Module):
    """Shallow VPT: ``num_tokens`` learned tokens spliced into the embeddings output after the prefix tokens."""

    def __init__(self, num_tokens: int, hidden_size: int, patch_size: int, num_prefix_tokens: int):
        super().__init__()
        # VPT's init: uniform with the Xavier bound of the patch projection (fan-in 3 * p * p, fan-out hidden).
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + hidden_size))
        self.tokens = nn.Parameter(torch.empty(num_tokens, hidden_size).uniform_(-bound, bound))
        self.num_prefix_tokens = num_prefix_tokens

    def insert(self, module: nn.Module, inputs: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        """A forward hook on ``Dinov2Model.embeddings``: [CLS, registers, patches] -> [CLS, registers, prompts, patches]."""
        k = self.num_prefix_tokens
        prompts = self.tokens.to(embeddings.dtype).expand(embeddings.shape[0], -1, -1)
        return torch.cat([embeddings[:, :k], prompts, embeddings[:, k:]], dim=1)


class ImageClassifier(nn.Module):
    """``backbone`` returns ``.last_hidden_state`` [B, T, D]; the head reads CLS and the patch-token mean (DINOv2's
    linear-evaluation features) or, for FastViT, its pooled feature map."""

    def __init__(self, backbone: nn.Module, kind: str, hidden_size: int, num_prefix_tokens: int, num_classes: int,
                 prompt: Optional[PromptTokens] = None, prefix: Optional[PrefixTuning] = None):
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens + (prompt.tokens.shape[0] if prompt is not None else 0)
        self.prompt = prompt
        self.prefix = prefix
        feature_dim = hidden_size if kind == "fastvit" else 2 * hidden_size
        self.head = nn.Linear(feature_dim, num_classes)
        self.summary: Optional[AdapterSummary] = None

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state
        if self.kind == "fastvit":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def load_backbone(spec: str, random_init: bool = False, weights: Optional[str] = None,
                  image_size: Optional[int] = None) -> tuple[nn.Module, str]:
    """``(module, kind)``: a FastViT name -> FastVitTokens; a CLIP name -> ClipVitTokens (``weights``: a local
    file); a stage-1 checkpoint -> its vision encoder with LoRA merged; anything else -> a DINOv2 folder or hub
    name."""
    if is_clip_backbone(spec):
        return create_clip_vit(spec, random_init, weights, image_size), "clip"
    if weights is not None:
        raise ConfigError("--weights is for CLIP backbones; a DINOv2 or FastViT loads its weights by name or folder")
    if is_fastvit_backbone(spec):
        return FastVitTokens(create_fastvit(spec, random_init)), "fastvit"
    if Path(spec).is_dir():
        from ..checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(spec)
        except FileNotFoundError:
            pass  # not a loravl checkpoint: a transformers folder
        else:
            return _stage1_backbone(spec)
    return load_dinov2(VisionConfig(pretrained=spec, random_init=random_init)), "dinov2"


def _stage1_backbone(path: str) -> tuple[nn.Module, str]:
    from ..loading import load_model

    vlm, cfg = load_model(path)
    encoder = vlm.vision.model
    backbone = encoder.merge_and_unload() if isinstance(encoder, PeftModel) else encoder
    return backbone, ("fastvit" if isinstance(backbone, FastVitTokens) else "dinov2")


def _backbone_shape(backbone: nn.Module, kind: str) -> tuple[int, int]:
    """(hidden size, prefix tokens before the patches)."""
    if kind in ("fastvit", "clip"):
        return backbone.hidden_size, backbone.num_prefix_tokens
    return backbone.config.hidden_size, 1 + getattr(backbone.config, "num_register_tokens", 0)


def intended_trainable(name: str, adapter: str) -> bool:
    """Whether parameter ``name`` of an ImageClassifier trains under ``adapter`` (the single rule, also for tests)."""
    if name.startswith("head."):
        return True
    if adapter == "lora":
        return "lora_" in name
    if adapter == "lora_fa":
        return ".lora_B." in name
    if adapter == "bitfit":
        return name.endswith(".bias")
    if adapter == "prompt":
        return name.startswith("prompt.")
    if adapter == "prefix":
        return name.startswith("prefix.")
    if adapter == "full":
        return True
    return False  # linear


def build_classifier(backbone_spec: str, num_classes: int, adapter: str, random_init: bool = False,
                     rank: int = 16, alpha: int = 32, lora_dropout: float = 0.1,
                     lora_targets: Optional[list[str]] = None, num_prompts: int = 10, weights: Optional[str] = None,
                     image_size: Optional[int] = None) -> ImageClassifier:
    """``num_prompts``: the prompt tokens (prompt) or the prefix length per layer (prefix)."""
    if adapter not in ADAPTERS:
        raise ConfigError(f"--adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")
    backbone, kind = load_backbone(backbone_spec, random_init, weights, image_size)
    hidden_size, num_prefix = _backbone_shape(backbone, kind)
    backbone.requires_grad_(False)

    lora_summary, prompt, prefix = None, None, None
    if adapter in ("lora", "lora_fa"):
        default_targets = CLIP_LORA_TARGETS if kind == "clip" else DEFAULT_LORA_TARGETS
        lora_cfg = LoraConfig(rank=rank, alpha=alpha, dropout=lora_dropout,
                              target_modules=list(lora_targets or default_targets), variant=adapter)
        if kind == "fastvit":  # ConvLoRA on every dense stage conv; lora_targets do not apply
            targets = dense_conv_names(backbone)
        else:
            targets = resolve_target_modules(backbone, lora_cfg.target_modules)
        backbone = get_peft_model(backbone, peft_lora_config(lora_cfg, targets))
        lora_summary = injection_summary(backbone, lora_cfg)
        if adapter == "lora_fa":
            apply_lora_fa(backbone)
    elif adapter in ("prompt", "prefix") and kind == "fastvit":
        raise ConfigError(f"--adapter {adapter} needs a ViT backbone (DINOv2, CLIP): FastViT has no attention "
                          f"over a token sequence")
    elif adapter == "prompt":
        patch_size = backbone.patch_size if kind == "clip" else backbone.config.patch_size
        prompt = PromptTokens(num_prompts, hidden_size, patch_size, num_prefix)
        # CLIP: after the class token, positions and ln_pre, before the first block
        embeddings = backbone.visual.ln_pre if kind == "clip" else backbone.embeddings
        embeddings.register_forward_hook(prompt.insert)
    elif adapter == "prefix":
        heads = backbone.visual.transformer.resblocks[0].attn.num_heads if kind == "clip" else \
            backbone.config.num_attention_heads
        layers = len(backbone.visual.transformer.resblocks) if kind == "clip" else backbone.config.num_hidden_layers
        prefix = PrefixTuning(layers, num_prompts, hidden_size, heads)
        prefix.attach(backbone, kind)

    model = ImageClassifier(backbone, kind, hidden_size, num_prefix, num_classes, prompt, prefix)
    for name, p in model.named_parameters():
        p.requires_grad_(intended_trainable(name, adapter))
    model.summary = _summarise(model, adapter, lora_summary)
    return model


def _summarise(model: ImageClassifier, adapter: str, lora_summary: Optional[InjectionSummary]) -> AdapterSummary:
    head = sum(p.numel() for p in model.head.parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    count = sum(p.numel() for _, p in trained)
    total = sum(p.numel() for p in model.parameters())
    detail = {
        "lora": "A and B train",
        "lora_fa": "A frozen at its random init, B trains (LoRA-FA gradient correction)",
        "bitfit": f"{len(trained)} bias vectors",
        "prompt": f"{model.prompt.tokens.shape[0] if model.prompt is not None else 0} prompt tokens (shallow VPT)",
        "prefix": (f"{model.prefix.keys.shape[1]} key and value prefixes in each of {model.prefix.keys.shape[0]} "
                   f"attention layers, zero-init gates" if model.prefix is not None else ""),
        "full": f"all {len(trained)} backbone tensors",
        "linear": "backbone frozen",
    }[adapter]
    return AdapterSummary(adapter, count, head, total, detail, lora_summary)
