"""Prefix tuning (Li & Liang, 2021) for vision transformers: learned key and value vectors in every attention
layer, which every token attends to; the backbone's weights stay frozen.

Li & Liang put the prefixes in the layer's own softmax, so a fresh prefix changes every output at step 0. Here
each layer attends to its prefixes in a softmax of its own, and that output joins the layer's through a learned
gate that starts at 0 (LLaMA-Adapter's zero-init attention, Zhang et al. 2023): at init the classifier is exactly
the backbone's, and the gates open as training finds prefixes worth reading. The prefixes enter after the value
projection and before the output projection, where the layer's own values are mixed, through a forward hook on
each attention module (DINOv2's, either transformers naming, and CLIP's ``nn.MultiheadAttention``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PrefixTuning(nn.Module):
    def __init__(self, num_layers: int, num_tokens: int, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.keys = nn.Parameter(torch.randn(num_layers, num_tokens, hidden_size) * 0.02)
        self.values = nn.Parameter(torch.randn(num_layers, num_tokens, hidden_size) * 0.02)
        self.gates = nn.Parameter(torch.zeros(num_layers))

    def context(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """What the queries [B, T, D] read from this layer's prefixes, heads merged: [B, T, D]."""
        batch, tokens, width = query.shape
        heads, head_dim = self.num_heads, width // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

        keys = split(self.keys[layer].to(query.dtype)[None]).expand(batch, -1, -1, -1)
        values = split(self.values[layer].to(query.dtype)[None]).expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(split(query), keys, values)
        return out.transpose(1, 2).reshape(batch, tokens, width)

    def attach(self, backbone: nn.Module, kind: str) -> None:
        """Hook every attention layer of a DINOv2 (``kind`` "dinov2") or CLIP ViT ("clip")."""
        for layer, (attention, query, out_weight) in enumerate(attention_layers(backbone, kind)):
            attention.register_forward_hook(self._hook(layer, query, out_weight), with_kwargs=True)

    def _hook(self, layer: int, query: Callable[[torch.Tensor], torch.Tensor],
              out_weight: Callable[[], torch.Tensor]) -> Callable:
        def add_prefix_output(module: nn.Module, args: tuple, kwargs: dict, output):
            hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
            prefix = F.linear(self.context(layer, query(hidden)), out_weight().to(hidden.dtype))
            gated = self.gates[layer].to(prefix.dtype) * prefix
            if isinstance(output, tuple):
                return (output[0] + gated, *output[1:])
            return output + gated
        return add_prefix_output


def attention_layers(backbone: nn.Module, kind: str) -> list[tuple[nn.Module, Callable, Callable]]:
    """(attention module, its query projection as a function, its output projection's weight) per layer."""
    layers = []
    if kind == "clip":
        for block in backbone.visual.transformer.resblocks:
            mha = block.attn
            width = mha.embed_dim

            def query(x: torch.Tensor, mha: nn.MultiheadAttention = mha, width: int = width) -> torch.Tensor:
                return F.linear(x, mha.in_proj_weight[:width], mha.in_proj_bias[:width])

            layers.append((mha, query, lambda mha=mha: mha.out_proj.weight))
        return layers
    for block in backbone.encoder.layer:
        attention = block.attention
        # transformers 5.23: q_proj .. o_proj on the attention module; 5.17: attention.query, output.dense
        query = getattr(attention, "q_proj", None) or attention.attention.query
        out = getattr(attention, "o_proj", None) or attention.output.dense
        layers.append((attention, query, lambda out=out: out.weight))
    return layers
