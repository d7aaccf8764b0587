"""How the ITC image embedding is read off the compressed image tokens (``model.loss.image_pooling``).

- ``cls``: the compressed CLS token (ALBEF/BLIP with a pretrained encoder).
- ``mean``: the mean of all tokens (open_clip's 'avg').
- ``attention``: multi-head attention pooling from one learned probe, then a residual MLP (SigLIP's MAP head,
  CLIP's attention pool). Its weights depend on the tokens, so it can pick out where each object is; a mean
  can only sum token-wise features, and a random encoder's CLS varies little between images.
"""
from __future__ import annotations

import torch
from torch import nn


class ImagePool(nn.Module):
    def __init__(self, mode: str, dim: int, num_heads: int = 4):
        super().__init__()
        self.mode = mode
        if mode == "attention":
            if dim % num_heads:
                raise ValueError(f"model.loss.image_pooling_heads={num_heads} must divide the image token width {dim}")
            self.probe = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
            self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
            self.norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, D]"""
        if self.mode == "cls":
            return image_tokens[:, 0]
        if self.mode == "mean":
            return image_tokens.mean(dim=1)
        probe = self.probe.expand(image_tokens.shape[0], -1, -1).to(image_tokens.dtype)
        pooled = self.attn(probe, image_tokens, image_tokens, need_weights=False)[0]
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]
