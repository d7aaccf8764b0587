"""The frozen DINOv2's attention with its CLS and register keys kept out of cuDNN's fused kernel: in the package
from 2026-12-01's ninth session until 2026-12-02's fourteenth, now a bench variant only.

At 224 px DINOv2 has 256 patch tokens plus CLS. 257 keys are one past a multiple of the kernel's 128-row tiles;
the split runs every query over the 256 patch keys in the kernel (which also gives each query's log-sum-exp) and
``merge_prefix_keys`` adds the prefix keys' share in one compiled pass. Alone it measured 0.148-0.157 ms a layer
against 0.168 ms in one kernel (H200), and +0.5-1.0% on the phase-1 step. It left the package because inductor
autotunes the merge's launch configuration when the graph first runs: compiled in the trainer (its loader
running), it chose one row per block on both machines traced, a kernel of 240 us instead of 35, and the step lost
8% (BENCHMARKS.md, fourteenth session).

    from prefix_split import use_prefix_split; use_prefix_split(backbone)   # a transformers DINOv2 model
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

VISION_ATTENTION = "bench_prefix_split_sdpa"
PATCH_TILE = 128  # the fused attention kernels' row tile: the split pays where the patch tokens fill whole tiles


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


def sdpa_prefix_split_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, except with no gradient, mask or dropout, CUDA half precision and patch
    tokens that fill whole kernel tiles: then ``prefix_split_attention``."""
    num_prefix = 1 + getattr(module.config, "num_register_tokens", 0)
    num_patches = query.shape[-2] - num_prefix
    if (not torch.is_grad_enabled() and attention_mask is None and dropout == 0.0 and num_patches > 0
            and num_patches % PATCH_TILE == 0 and key.shape[-2] == query.shape[-2]
            and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = prefix_split_attention(query, key, value, scale, num_prefix)
        return out.transpose(1, 2).contiguous(), None  # [B, L, H, D], as transformers' SDPA returns it
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(VISION_ATTENTION, sdpa_prefix_split_attention)


def use_prefix_split(backbone: nn.Module) -> None:
    """Switch a transformers DINOv2 model (SDPA) to the split attention."""
    backbone.set_attn_implementation(VISION_ATTENTION)
