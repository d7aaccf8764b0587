"""The learned token compressor: every encoder token (CLS, registers, patches) from the encoder width to 128-d."""
from __future__ import annotations

import torch
from torch import nn

from .config import CompressorConfig


class TokenCompressor(nn.Module):
    """Linear(hidden -> 384) -> ReLU -> Dropout -> Linear(384 -> 128) -> LayerNorm(128), token-wise."""

    def __init__(self, input_dim: int, cfg: CompressorConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, cfg.hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, cfg.embed_dim),
            nn.LayerNorm(cfg.embed_dim),
        )
        self.output_dim = cfg.embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)
