"""Which SDPA kernel the masked attentions take on a GPU.

On sm90 SDPA prefers cuDNN's fused attention, the fastest for the encoder's and the unmasked cross-attentions.
For the masked ones over a few dozen text keys (the text model's causal-plus-padding self-attention, fusion's
image-to-text attention over the padded captions) the memory-efficient kernel takes less device time (measured
per site and kernel on an H200; the script is in git history, bench/sdpa_backends.py).
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Math last: what any shape can fall back to.
MASKED_TEXT_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_text_attention(query: torch.Tensor, mask) -> contextlib.AbstractContextManager:
    """The memory-efficient kernel for a masked attention on a GPU with more than one query (not a decoding
    step); elsewhere SDPA chooses as it would."""
    if query.is_cuda and mask is not None and query.shape[-2] > 1:
        return sdpa_kernel(MASKED_TEXT_BACKENDS)
    return contextlib.nullcontext()
