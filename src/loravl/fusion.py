"""FIBER-style fusion: gated cross-attention both ways between image tokens and text states.

Each block lets text attend to the image and the image attend to the text; every cross-modal branch (attention and
the feed-forward after it) is scaled by a learnable scalar gate that starts at 0, as in FIBER, so at initialisation
the unimodal features pass through unchanged and fusion is learned in gradually.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import masked_text_attention
from .config import FusionConfig


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (width ``dim``) onto ``context`` (width ``context_dim``), through SDPA."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.fusion.num_heads={num_heads} must divide the stream width {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        # context_mask: [B, M], True/1 where the context token is real (text padding is 0)
        attn_mask = None if context_mask is None else context_mask.bool()[:, None, None, :]
        with masked_text_attention(q, attn_mask):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class GatedCrossBlock(nn.Module):
    """x + a * CrossAttn(LN(x), context); x + b * FFN(LN(x)); gates a, b start at 0."""

    def __init__(self, dim: int, context_dim: int, cfg: FusionConfig):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.attn = CrossAttention(dim, context_dim, cfg.num_heads, cfg.dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * cfg.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, dim))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn_gate * self.attn(self.norm_x(x), self.norm_context(context), context_mask)
        return x + self.ffn_gate * self.ffn(self.norm_ffn(x))


class FusionLayer(nn.Module):
    """Both directions at once: text reads the image, the image reads the text (each from the other's input).

    The last layer updates only the text: ITM reads the fused text, so an image update there would feed nothing
    (and DDP rejects parameters that get no gradient).
    """

    def __init__(self, image_dim: int, text_dim: int, cfg: FusionConfig, update_image: bool = True):
        super().__init__()
        self.text_from_image = GatedCrossBlock(text_dim, image_dim, cfg)
        self.image_from_text = GatedCrossBlock(image_dim, text_dim, cfg) if update_image else None

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        new_text = self.text_from_image(text, image, None)
        new_image = image if self.image_from_text is None else self.image_from_text(image, text, text_mask)
        return new_image, new_text


class FusionEncoder(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, cfg: FusionConfig):
        super().__init__()
        n = cfg.num_layers
        self.layers = nn.ModuleList([FusionLayer(image_dim, text_dim, cfg, update_image=i < n - 1) for i in range(n)])

    def forward(self, image_tokens: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> dict:
        image, text = image_tokens, text_states
        for layer in self.layers:
            image, text = layer(image, text, text_mask)
        return {"image_tokens": image, "text_states": text}
