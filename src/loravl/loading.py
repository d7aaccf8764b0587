"""A trained model for inference: exported as a self-contained folder, and loaded back from an export, a training
checkpoint or a checkpoint dir. This module imports the model; the model and the checkpoints never import it.

    <export>/loravl_export.json       format marker, whether LoRA is merged
    <export>/config.yaml               the RunConfig (paths below are relative to the folder)
    <export>/model.safetensors         every weight outside the vision encoder
    <export>/vision_backbone/          a plain DINOv2 (AutoModel.from_pretrained), LoRA merged into it or not
    <export>/vision_adapter/           the PEFT adapter (adapter_config.json, adapter_model.safetensors)
    <export>/tokenizer/                the caption tokenizer
    <export>/text_lm/                  the text model alone as a transformers causal LM with its tokenizer
                                       (``export_text_lm``), for lm-evaluation-harness and the BabyLM pipeline

Unmerged: backbone + adapter reproduce the trained encoder. Merged: the backbone alone is the trained encoder
(the adapter is kept for reference; loading does not apply it).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from .checkpoint import (
    EXPORT_MARKER,
    LATEST,
    MODEL_FILE,
    TMP_PREFIX,
    resolve_checkpoint,
)
from .config import RunConfig, TextConfig, config_from_dict, load_config, save_config
from .integrity import verify, write_manifest
from .model import VisionLanguageModel
from .text import CaptionTokenizer, load_tokenizer
from .weights import ModelWeights, load_weights_into, read_weights, save_weights

BACKBONE_DIR = "vision_backbone"
TEXT_LM_DIR = "text_lm"
ADAPTER_DIR = "vision_adapter"
TOKENIZER_DIR = "tokenizer"


def caption_tokenizer(path: str | Path, text: TextConfig) -> CaptionTokenizer:
    """The caption tokenizer saved at ``path``, padding and truncating to ``text.max_length``."""
    return CaptionTokenizer(load_tokenizer(path), text.max_length)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VisionLanguageModel, RunConfig]:
    """A model in eval mode, and its config, from a training checkpoint folder, a checkpoint dir (its ``latest``),
    the ``latest`` pointer file itself, or a folder written by ``export_model`` (LoRA merged or not)."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = path.parent
    folder = resolve_checkpoint(path)
    verify(folder)  # a damaged file fails here, naming itself, instead of loading as noise
    if (folder / EXPORT_MARKER).is_file():
        model, cfg = _load_exported(folder)
    else:
        cfg = load_config(folder / "config.yaml")
        cfg.model.text.tokenizer = str(folder / "tokenizer")
        if cfg.model.vision.random_init:
            # The whole encoder is in the checkpoint; only the architecture is needed.
            cfg.model.vision.pretrained = str(folder / "vision_config")
        model = VisionLanguageModel(cfg.model, caption_tokenizer(folder / "tokenizer", cfg.model.text))
        ModelWeights(model).load(folder / MODEL_FILE)
    return model.to(device).eval(), cfg


def load_model_for_command(checkpoint: str | os.PathLike, device: str | None
                           ) -> tuple[VisionLanguageModel, RunConfig] | None:
    """``load_model`` for the command-line tools: a device name that cannot be used, a missing folder, a bad
    config or weights that do not match print one ``error: cannot load ...`` line on stderr and give None."""
    import sys

    from .device import resolve_device

    try:
        return load_model(checkpoint, resolve_device(device))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: cannot load {checkpoint}: {e}", file=sys.stderr)
        return None


def _non_vision_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}


@torch.no_grad()
def export_model(model: VisionLanguageModel, cfg: RunConfig, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """Write ``model`` to ``out_dir`` (replaced atomically). The model itself is not modified. ``cfg`` is the run's
    whole config: it is written beside the weights, so that ``load_model`` rebuilds the same model."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f"{TMP_PREFIX}{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    peft_model = model.vision.model
    peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
    encoder = copy.deepcopy(peft_model).cpu()
    backbone = encoder.merge_and_unload() if merge_lora else encoder.unload()
    backbone.save_pretrained(str(tmp / BACKBONE_DIR))
    save_weights(_non_vision_state(model), tmp / MODEL_FILE)
    model.tokenizer.save(tmp / TOKENIZER_DIR)
    export_text_lm(model, tmp / TEXT_LM_DIR)

    exported = config_from_dict(cfg.to_dict())
    exported.model.vision.pretrained = BACKBONE_DIR
    exported.model.vision.random_init = False
    exported.model.text.tokenizer = TOKENIZER_DIR
    save_config(exported, tmp / "config.yaml")
    (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "loravl-export", "version": 1,
                                                 "lora_merged": merge_lora}, indent=1))
    write_manifest(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


@torch.no_grad()
def export_text_lm(model: VisionLanguageModel, out_dir: str | Path) -> Path:
    """The text model read without images (``loravl.scoring``'s text-only scorer) as a plain ``GPT2LMHeadModel``:
    the same weights less the cross-attention layers, transformers' own attention. The tokenizer lower-cases its
    input and starts each text with <bos>, as loravl's scoring does, so that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` (lm-evaluation-harness, the BabyLM pipeline) give loravl's log-probabilities, with no loravl
    code."""
    from tokenizers import normalizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    settings = model.text.config.to_dict()
    settings.update(add_cross_attention=False, architectures=["GPT2LMHeadModel"])
    settings.pop("_attn_implementation", None)
    settings.pop("attn_implementation", None)
    text_lm = GPT2LMHeadModel(GPT2Config(**settings))
    state = {k: v for k, v in model.text.state_dict().items() if ".crossattention." not in k and ".ln_cross_attn." not in k}
    text_lm.load_state_dict(state, strict=True)
    text_lm.save_pretrained(str(out_dir))

    tokenizer = copy.deepcopy(model.tokenizer.tokenizer)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Lowercase()
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _load_exported(folder: Path) -> tuple[VisionLanguageModel, RunConfig]:
    info = json.loads((folder / EXPORT_MARKER).read_text())
    cfg = load_config(folder / "config.yaml")
    cfg.model.vision.pretrained = str(folder / BACKBONE_DIR)
    cfg.model.text.tokenizer = str(folder / TOKENIZER_DIR)
    model = VisionLanguageModel(cfg.model, caption_tokenizer(folder / TOKENIZER_DIR, cfg.model.text))
    vision_keys = {k for k in model.state_dict() if k.startswith("vision.")}
    load_weights_into(model, read_weights(folder / MODEL_FILE), allowed_missing=vision_keys)
    if not info["lora_merged"]:
        adapter = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model.vision.model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"adapter does not match the encoder: {result.unexpected_keys[:5]}")
    # Merged: the backbone already holds the adapted weights; the freshly injected LoRA has B = 0, a no-op.
    return model, cfg
