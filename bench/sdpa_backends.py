"""Which SDPA backend is fastest for each attention of the stage-1 step, at the step's shapes (one GPU).

    python bench/sdpa_backends.py --out sdpa_backends.json

For each call site (shapes at batch 128, 224 px, captions padded to 24 tokens; ITM runs 3 x 128 pairs), each
backend (cuDNN, flash, memory-efficient, math) is timed forward and forward + backward by the device time of its
kernels, bf16, with the layouts the model gives (heads split from a [B, L, H, D] projection, then transposed).
A backend that cannot run a shape (flash with a mask) reports its error. The text model's self-attention is timed
with its causal-plus-padding mask and, as the alternative for right-padded batches, with ``is_causal`` alone: with
right padding every real token sees exactly the same keys either way. The cross-modal sites (text onto the image
tokens and back) are also timed as ``explicit_attention`` below, compiled (columns ``explicit`` and
``explicit_fp32``: measured against the fused kernels and not taken); ``--tables`` keeps its kernels. The
captioner's cross-attention is timed with and without its dropout (0.1, the text model's). Each forward row without
dropout has ``rel_error``: the largest difference from fp32 attention, relative to the largest output.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
COLUMNS = [*BACKENDS, "explicit", "explicit_fp32"]  # explicit_fp32: its scores as an fp32 product


def explicit_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, scale=None,
                       fp32_scores: bool = False):
    """``softmax(q k^T * scale + mask) v`` over ``[B, H, L, D]`` as two batched products and a softmax, for inductor
    to fuse around cuBLAS's products: the alternative to the fused kernels for the cross-modal sites. The scores are
    rounded to the inputs' dtype by the product (transformers' eager attention under autocast) unless
    ``fp32_scores``; the weights are rounded back before the second product, as the fused kernels round them."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if fp32_scores:
        scores = torch.matmul(query.float() * scale, key.float().transpose(-2, -1))
    else:
        scores = torch.matmul(query * scale, key.transpose(-2, -1)).float()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights.to(value.dtype), value)


def heads(b, length, h, d, device, dtype, requires_grad):
    x = torch.randn(b, length, h, d, device=device, dtype=dtype).transpose(1, 2)
    return x.detach().requires_grad_(requires_grad)


def kernel_ms(fn, warmup=5, iters=20, tables: dict | None = None, name: str = "") -> float:
    """Device time of the kernels one call launches (profiler), per call: at these sizes a call's wall time is
    mostly launch latency, which the compiled step with CUDA graphs does not pay. ``tables``: the kernels' table
    is kept there under ``name``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events()
             if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    if tables is not None:
        tables[name] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14,
                                                 max_name_column_width=90)
    return us / iters / 1e3


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of ``a`` from ``b``, relative to ``b``'s largest value."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def relative_error(q, k, v, kwargs, backend, fp32_scores, explicit) -> float:
    """``rel_diff`` of one output from fp32 attention (SDPA's math kernel on fp32 copies)."""
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    with torch.no_grad():
        if explicit is not None:
            out = explicit(q, k, v, kwargs.get("attn_mask"), 0.0, fp32_scores=fp32_scores)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return rel_diff(out, exact)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--text_length", type=int, default=24)
    ap.add_argument("--out", default="sdpa_backends.json")
    ap.add_argument("--tables", default="", help="write the explicit rows' kernel tables to this text file")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    b, L, n = args.batch_size, args.text_length, 257
    lengths = torch.randint(L // 2, L + 1, (b,), device=device)
    pad = torch.arange(L, device=device)[None, :] < lengths[:, None]  # [B, L], True where a real token
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    text_mask = causal[None, None] & pad[:, None, None, :]  # what transformers builds: [B, 1, L, L]
    pair_pad = pad.repeat(3, 1)[:, None, None, :]  # ITM: keys are the pairs' texts, [3B, 1, 1, L]
    # name: (q shape (B, Lq, H, D), kv shape (B, Lk, H, D), sdpa kwargs)
    sites = {
        "encoder self-attention": ((b, n, 12, 64), (b, n, 12, 64), {}),
        "text self-attention, causal + padding mask": ((b, L, 8, 64), (b, L, 8, 64), {"attn_mask": text_mask}),
        "text self-attention, is_causal (right padding)": ((b, L, 8, 64), (b, L, 8, 64), {"is_causal": True}),
        "captioner cross-attention to image tokens": ((b, L, 8, 64), (b, n, 8, 64), {}),
        "the same with dropout 0.1 (training)": ((b, L, 8, 64), (b, n, 8, 64), {"dropout_p": 0.1}),
        "fusion text_from_image (3B pairs)": ((3 * b, L, 8, 64), (3 * b, n, 8, 64), {}),
        "fusion image_from_text (3B pairs, padding mask)": ((3 * b, n, 8, 16), (3 * b, L, 8, 16),
                                                            {"attn_mask": pair_pad}),
    }
    cross_modal = [site for site in sites if not site.startswith(("encoder", "text"))]
    rows, tables = [], {}
    for site, (q_shape, kv_shape, kwargs) in sites.items():
        for backend_name in COLUMNS if site in cross_modal else BACKENDS:
            backend = BACKENDS.get(backend_name)
            for backward in (False, True):
                q = heads(*q_shape, device, dtype, backward)
                k, v = (heads(*kv_shape, device, dtype, backward) for _ in range(2))

                grad_out = torch.ones(q_shape[0], q_shape[2], q_shape[1], kv_shape[3], device=device, dtype=dtype)

                explicit, fp32_scores = None, backend_name == "explicit_fp32"
                if backend is None:  # explicit_attention, compiled afresh for each shape and pass
                    torch._dynamo.reset()
                    explicit = torch.compile(explicit_attention, dynamic=False)

                def call():
                    if explicit is not None:
                        out = explicit(q, k, v, kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0),
                                       fp32_scores=fp32_scores)
                    else:
                        with sdpa_kernel(backend):
                            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
                    if backward:
                        out.backward(grad_out)
                        q.grad = k.grad = v.grad = None  # no kernel: the next backward writes fresh tensors

                row = {"site": site, "backend": backend_name, "pass": "fwd+bwd" if backward else "fwd"}
                try:
                    row["ms"] = kernel_ms(call, tables=tables if explicit is not None else None,
                                          name=f"{backend_name}, {site}, {row['pass']}")
                    if not backward and not kwargs.get("dropout_p"):
                        row["rel_error"] = relative_error(q, k, v, kwargs, backend, fp32_scores, explicit)
                except RuntimeError as e:
                    row["error"] = str(e).splitlines()[0][:160]
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    if args.tables:
        Path(args.tables).write_text("".join(f"## {name}\n{table}\n\n" for name, table in tables.items()))
    print(f"\n{'site':<50}{'pass':>9}" + "".join(f"{n:>11}" for n in COLUMNS))
    for site in sites:
        for p in ("fwd", "fwd+bwd"):
            cells = {r["backend"]: r for r in rows if r["site"] == site and r["pass"] == p}
            print(f"{site:<50}{p:>9}" + "".join(f"{cells[n]['ms']:>11.3f}" if "ms" in cells.get(n, {})
                                                  else f"{'-':>11}" for n in COLUMNS))


if __name__ == "__main__":
    main()
