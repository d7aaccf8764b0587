"""Which SDPA backend is fastest for each attention of the stage-1 step, at the step's shapes (one GPU).

    python bench/sdpa_backends.py --out sdpa_backends.json

For each call site (shapes at batch 128, 224 px, captions padded to 24 tokens; ITM runs 3 x 128 pairs), each
backend (cuDNN, flash, memory-efficient, math) is timed forward and forward + backward by the device time of its
kernels, bf16, with the layouts the model gives (heads split from a [B, L, H, D] projection, then transposed). A backend that cannot run a shape (flash
with a mask) reports its error. The text model's self-attention is timed with its causal-plus-padding mask and,
as the alternative for right-padded batches, with ``is_causal`` alone: with right padding every real token sees
exactly the same keys either way.
"""
from __future__ import annotations

import argparse
import json
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--text_length", type=int, default=24)
    ap.add_argument("--out", default="sdpa_backends.json")
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
        "fusion text_from_image (3B pairs)": ((3 * b, L, 8, 64), (3 * b, n, 8, 64), {}),
        "fusion image_from_text (3B pairs, padding mask)": ((3 * b, n, 8, 16), (3 * b, L, 8, 16),
                                                            {"attn_mask": pair_pad}),
    }
    rows = []
    for site, (q_shape, kv_shape, kwargs) in sites.items():
        for backend_name, backend in BACKENDS.items():
            for backward in (False, True):
                q = heads(*q_shape, device, dtype, backward)
                k, v = (heads(*kv_shape, device, dtype, backward) for _ in range(2))

                grad_out = torch.ones(q_shape[0], q_shape[2], q_shape[1], kv_shape[3], device=device, dtype=dtype)

                def call():
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
                    if backward:
                        out.backward(grad_out)
                        q.grad = k.grad = v.grad = None  # no kernel: the next backward writes fresh tensors

                row = {"site": site, "backend": backend_name, "pass": "fwd+bwd" if backward else "fwd"}
                try:
                    row["ms"] = kernel_ms(call)
                except RuntimeError as e:
                    row["error"] = str(e).splitlines()[0][:160]
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"\n{'site':<50}{'pass':>9}" + "".join(f"{n:>11}" for n in BACKENDS))
    for site in sites:
        for p in ("fwd", "fwd+bwd"):
            cells = {r["backend"]: r for r in rows if r["site"] == site and r["pass"] == p}
            print(f"{site:<50}{p:>9}" + "".join(f"{cells[n]['ms']:>11.3f}" if "ms" in cells[n] else f"{'-':>11}"
                                                  for n in BACKENDS))


if __name__ == "__main__":
    main()
