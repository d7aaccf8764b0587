"""Shared tiny fixtures: a DINOv2 saved to a temp folder and loaded back through from_pretrained, a tokenizer
trained on demo-style captions, and a tiny model config. No network."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from transformers import Dinov2Config, Dinov2Model

from loravl.config import (CompressorConfig, FusionConfig, LoraConfig, LossConfig, ModelConfig,
                           TextConfig, VisionConfig)
from loravl.text import CaptionTokenizer, train_tokenizer

TINY_CAPTIONS = [
    f"a {c1} {s1} {rel} a {c2} {s2}"
    for c1 in ("red", "green", "blue") for s1 in ("circle", "square") for rel in ("left of", "above")
    for c2 in ("yellow", "purple") for s2 in ("triangle", "square")
]


def tiny_dinov2_config(**overrides) -> Dinov2Config:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=28, patch_size=14)
    kwargs.update(overrides)
    return Dinov2Config(**kwargs)


@pytest.fixture(scope="session")
def tiny_dinov2_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(tiny_dinov2_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer(train_tokenizer(TINY_CAPTIONS, vocab_size=320), max_length=12)


@pytest.fixture
def tiny_model_config(tiny_dinov2_path) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(pretrained=tiny_dinov2_path, image_size=28, lora=LoraConfig(rank=4, alpha=8)),
        compressor=CompressorConfig(hidden_dim=24, embed_dim=16),
        text=TextConfig(vocab_size=320, max_length=12, num_layers=2, hidden_size=32, num_heads=2),
        fusion=FusionConfig(num_layers=2, num_heads=2),
        loss=LossConfig(embed_dim=16, queue_size=32),
    )


def tiny_batch(tokenizer: CaptionTokenizer, batch_size: int = 4, image_ids=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    captions = [TINY_CAPTIONS[(seed * 7 + i) % len(TINY_CAPTIONS)] for i in range(batch_size)]
    tokens = tokenizer(captions)
    ids = torch.arange(batch_size) if image_ids is None else torch.as_tensor(image_ids)
    return {"pixel_values": torch.randn(batch_size, 3, 28, 28, generator=g), "image_ids": ids, **tokens}


@pytest.fixture
def single_thread():
    """One intra-op thread: small tensors on the shared 2-core machine run several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
