"""Candidate cuts in the frozen DINOv2-base encoder's kernels, at the phase-1 step's shapes (one GPU).

    python bench/encoder_kernels.py --out encoder_kernels.json

The frozen encoder is half of a phase-1 step's GPU time (bench/step_parts.py). Two of its parts are timed here
against an alternative, by the device time of their kernels (profiler), bf16, batch 128 at 224 px (257 tokens):
- the query, key and value projections as three [tokens, 768] x [768, 768] products with bias (what HF's layer
  runs), against one [tokens, 768] x [768, 2304] product with the three weights stacked;
- self-attention over 257 tokens (CLS + 256 patches) with SDPA's cuDNN kernel, against 256 tokens for reference
  (a tile boundary: 257 is one token past it), the same split into the CLS query and the 256 patch queries
  (both over all 257 keys), 257 queries over the 256 patch keys, ``prefix_split.prefix_split_attention``
  (the CLS key kept out of the fused kernel; the frozen encoder's from the ninth to the fourteenth session),
  eager and compiled, and ``split_patch_queries`` below (the CLS query kept out too), compiled; flash's kernel
  for reference.
Each alternative's output is compared with the original's (largest difference, relative to the largest value).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import sdpa_backends  # noqa: E402  (this folder: the script's own)
from sdpa_backends import rel_diff  # noqa: E402
from prefix_split import prefix_split_attention  # noqa: E402  (this folder)


KERNEL_TABLES: dict[str, str] = {}


def kernel_ms(fn, table: str = "") -> float:
    """sdpa_backends.kernel_ms; ``table``: keep the kernels' table under that name."""
    return sdpa_backends.kernel_ms(fn, tables=KERNEL_TABLES if table else None, name=table)


def split_patch_queries(query, key, value, scale, p):
    """The alternative to prefix_split_attention that keeps the prefix queries out of the fused kernel too: the
    patch queries over the patch keys there (256 x 256 at 224 px), the prefix keys merged in, and the prefix
    queries over every key with plain reductions; [B, L, H, D]."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query[:, :, p:], key[:, :, p:], value[:, :, p:], None, True, 0.0, False, False, scale=scale)[:2]
    lse = lse.float().reshape(*out.shape[:-1], 1)
    queries, out, lse = query[:, :, p:].transpose(1, 2).float(), out.transpose(1, 2).float(), lse.transpose(1, 2)
    score = (queries * key[:, :, :1].transpose(1, 2).float()).sum(-1, keepdim=True) * scale
    v0 = value[:, :, :1].transpose(1, 2).float()
    patch_rows = out + torch.sigmoid(score - lse) * (v0 - out)  # p == 1 only: the bench's shapes
    prefix_q = query[:, :, :p].transpose(1, 2).float()  # [B, P, H, D]
    keys, values = key.transpose(1, 2).float(), value.transpose(1, 2).float()  # [B, L, H, D]
    weights = ((prefix_q[:, :, None] * keys[:, None]).sum(-1) * scale).softmax(2)  # [B, P, L, H]
    prefix_rows = (weights[..., None] * values[:, None]).sum(2)  # [B, P, H, D]
    return torch.cat([prefix_rows.to(query.dtype), patch_rows.to(query.dtype)], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--out", default="encoder_kernels.json")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    b, n, d, h = args.batch_size, args.tokens, args.hidden, args.heads
    rows = {}

    x = torch.randn(b * n, d, device=device, dtype=dtype)
    ws = [torch.randn(d, d, device=device, dtype=dtype) * d ** -0.5 for _ in range(3)]
    bs = [torch.randn(d, device=device, dtype=dtype) * 0.02 for _ in range(3)]
    w_qkv, b_qkv = torch.cat(ws), torch.cat(bs)
    with torch.no_grad():
        separate = lambda: [F.linear(x, w, bias) for w, bias in zip(ws, bs)]
        stacked = lambda: F.linear(x, w_qkv, b_qkv)
        rows["qkv, three products"] = {"ms": kernel_ms(separate)}
        rows["qkv, one stacked product"] = {"ms": kernel_ms(stacked),
                                            "max_rel_diff": rel_diff(stacked(), torch.cat(separate(), dim=-1))}
        rows["one [768, 768] product"] = {"ms": kernel_ms(lambda: F.linear(x, ws[0], bs[0]))}

        def heads(length):
            return torch.randn(b, length, h, d // h, device=device, dtype=dtype).transpose(1, 2)

        q, k, v = heads(n), heads(n), heads(n)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            whole = lambda: F.scaled_dot_product_attention(q, k, v)
            two_calls = lambda: torch.cat([F.scaled_dot_product_attention(q[:, :, :1], k, v),
                                           F.scaled_dot_product_attention(q[:, :, 1:], k, v)], dim=2)
            rows[f"attention, {n} tokens, cuDNN"] = {"ms": kernel_ms(whole)}
            rows[f"attention, 1 + {n - 1} queries over {n} keys, cuDNN"] = {
                "ms": kernel_ms(two_calls), "max_rel_diff": rel_diff(two_calls(), whole())}
            qc, kc, vc = (t[:, :, 1:].contiguous() for t in (q, k, v))  # the 256 patch tokens alone
            rows[f"attention, {n - 1} tokens, cuDNN (reference)"] = {
                "ms": kernel_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc))}
        # As transformers' attention returns it: [B, L, H, D] contiguous (a no-op after cuDNN's kernel, whose
        # output has the query's [B, L, H, D] memory layout).
        scale = (d // h) ** -0.5

        def prefix_split(q, k, v):
            return prefix_split_attention(q, k, v, scale, 1).transpose(1, 2).contiguous()

        split_eager = lambda: prefix_split(q, k, v)
        compiled = torch.compile(prefix_split)
        split_compiled = lambda: compiled(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            reference = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()
            rows[f"attention, {n} tokens, cuDNN, then [B, L, H, D] contiguous"] = {"ms": kernel_ms(
                lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous())}
        for name, fn in (("eager", split_eager), ("compiled", split_compiled)):
            label = f"attention, prefix_split_attention (CLS apart), {name}"
            rows[label] = {"ms": kernel_ms(fn, table=label if name == "compiled" else ""),
                           "max_rel_diff": rel_diff(fn(), reference)}
        compiled_v2 = torch.compile(split_patch_queries)
        label = "attention, patch queries over patch keys + the CLS query apart, compiled"
        rows[label] = {"ms": kernel_ms(lambda: compiled_v2(q, k, v, scale, 1), table=label),
                       "max_rel_diff": rel_diff(compiled_v2(q, k, v, scale, 1), reference)}
        cudnn_lse = torch.ops.aten._scaled_dot_product_cudnn_attention
        rows[f"attention, {n} queries over {n - 1} keys, cuDNN with log-sum-exp"] = {
            "ms": kernel_ms(lambda: cudnn_lse(q, k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False,
                                              scale=scale))}
        rows[f"attention, {n - 1} tokens, cuDNN with log-sum-exp"] = {
            "ms": kernel_ms(lambda: cudnn_lse(qc, kc, vc, None, True, 0.0, False, False, scale=scale))}
        rows[f"attention, {n - 1} tokens sliced from {n}, cuDNN with log-sum-exp"] = {
            "ms": kernel_ms(lambda: cudnn_lse(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False,
                                              False, scale=scale))}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            rows[f"attention, {n - 1} tokens, flash"] = {"ms": kernel_ms(
                lambda: F.scaled_dot_product_attention(qc, kc, vc))}
            rows[f"attention, {n} tokens, flash"] = {"ms": kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v))}

    for name, row in rows.items():
        extra = f"  max rel diff {row['max_rel_diff']:.2e}" if "max_rel_diff" in row else ""
        print(f"{name:55s} {row['ms']:8.3f} ms{extra}")
    for name, table in KERNEL_TABLES.items():
        print(f"\n## {name}\n{table}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                   "kernel_tables": KERNEL_TABLES}, f, indent=1)


if __name__ == "__main__":
    main()
