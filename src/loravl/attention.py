"""Which SDPA kernel the masked attentions take on a GPU, and the vision encoder's attention with its prefix
tokens kept out of the fused kernel.

On sm90 SDPA prefers cuDNN's fused attention, the fastest for the encoder's and the unmasked cross-attentions.
For the masked ones over a few dozen text keys (the text model's causal-plus-padding self-attention, fusion's
image-to-text attention over the padded captions) the memory-efficient kernel takes 30-40% and 15% less device
time (bench/sdpa_backends.py, H200: 0.058 against 0.085 ms and 0.571 against 0.676 ms forward and backward).
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


def prefix_split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                           num_prefix: int) -> torch.Tensor:
    """Unmasked self-attention ``[B, H, L, D]`` (no dropout, no gradient, CUDA half precision) over a ViT's tokens,
    whose first ``num_prefix`` keys (CLS, registers) are kept out of cuDNN's fused kernel.

    At 224 px DINOv2 has 256 patch tokens plus CLS. 257 keys are one past a multiple of the kernel's 128-row
    tiles, and the extra tile cost 0.054 ms of 0.168 for a batch of 128 (H200, bench/encoder_kernels.py: 0.114
    ms for the 257 queries over the 256 patch keys). So every query attends to the patch keys in the kernel, which
    also gives each query's log-sum-exp, and ``merge_prefix_keys`` adds the prefix keys' share: 0.148-0.157 ms in
    all, compiled.
    """
    p = num_prefix
    out, patch_lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key[:, :, p:], value[:, :, p:], None, True, 0.0, False, False, scale=scale)[:2]
    return merge_prefix_keys(query, key, value, scale, p, out, patch_lse.reshape(*query.shape[:-1], 1))


def merge_prefix_keys(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, num_prefix: int,
                      patch_out: torch.Tensor, patch_lse: torch.Tensor) -> torch.Tensor:
    """Attention over all keys ``[B, H, L, D]`` from the attention over the keys after the first ``num_prefix``
    (``patch_out``, and ``patch_lse``: each query's log-sum-exp of its scaled scores there, ``[B, H, L, 1]``).

    Exact: a softmax over two key sets is each set's own softmax, weighted by the sigmoid of the difference of
    their log-sum-exps. In half precision ``patch_out`` is rounded once more than inside one kernel over all keys:
    the result is within twice that kernel's rounding error (tests/test_attention.py). It runs in ``[B, L, H, D]``
    order, the memory order of transformers' projections and of what its attention returns, so that it compiles
    into one pass over the tokens: a reduction over the head dim, then one sigmoid a row (0.034 ms at
    DINOv2-base's shapes, batch 128, on the H200).
    """
    queries = query.transpose(1, 2).float()
    out, patch_lse = patch_out.transpose(1, 2).float(), patch_lse.float().transpose(1, 2)
    prefix_lse = prefix_mix = None  # the prefix keys' own log-sum-exp and softmax-weighted value, key by key
    # One prefix key at a time (a handful at most): a broadcast over a prefix dim made inductor materialise an
    # fp32 [B, H, L, D] sum (bench/encoder_kernels.py).
    for i in range(num_prefix):
        k = key[:, :, i : i + 1].transpose(1, 2).float()  # [B, 1, H, D]
        score = (queries * k).sum(-1, keepdim=True) * scale  # [B, L, H, 1]
        v = value[:, :, i : i + 1].transpose(1, 2).float()  # [B, 1, H, D]
        if prefix_lse is None:
            prefix_lse, prefix_mix = score, v
        else:
            lse = torch.logaddexp(prefix_lse, score)
            prefix_mix = (prefix_lse - lse).exp() * prefix_mix + (score - lse).exp() * v
            prefix_lse = lse
    merged = out + torch.sigmoid(prefix_lse - patch_lse) * (prefix_mix - out)
    return merged.to(query.dtype).contiguous().transpose(1, 2)
