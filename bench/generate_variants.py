"""Compiled greedy captioning on one GPU: which attention path the compiled decoding step takes, measured.

    python3 bench/generate_variants.py out.json      # dinov2-base + default text model, batch 256, 30 tokens

Variants, one model, one run: transformers' generate() with a dynamic cache; compile=True (static caches, decoding
step compiled with CUDA graphs); the same with only fused SDPA kernels allowed; with bf16 reductions in the math
SDPA path; and the best of those with a compiled encoder. The profile of compile=True
(bench/results/2026-11-23_h100_profile_generate_run5.txt) shows the cross-attention over the 257 cached image
tokens taking the math SDPA path, upcast to fp32, in every decoding step.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from loravl.config import ModelConfig, VisionConfig  # noqa: E402
from loravl.model import VisionLanguageModel  # noqa: E402
from throughput import random_word_tokenizer  # noqa: E402

FUSED = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@contextlib.contextmanager
def bf16_math_sdpa():
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)


def measure(model, pixels, ctx, compile: bool, compile_encoder: bool = False) -> dict:
    """Median of 4 timed calls after 3 warm-up calls (the first compiles, the next record the CUDA graphs)."""
    torch._dynamo.reset()
    model._decoding_caches.clear()
    if compile_encoder:
        model.vision.model.compile()
    try:
        def call():
            with ctx(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model.generate(pixels, max_new_tokens=30, min_new_tokens=30, compile=compile)

        for _ in range(3):
            captions = call()
        torch.cuda.synchronize()
        times = []
        for _ in range(4):
            t = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times.sort()
        return {"images_per_s": pixels.shape[0] / times[1], "median_ms": 1e3 * times[1], "caption0": captions[0][:60]}
    except Exception as e:  # one variant failing must not lose the others
        text = str(e)  # the reason a kernel was refused comes at the end of a long message
        return {"error": f"{type(e).__name__}: {text[:300]} ... {text[-1500:]}"}


def main() -> None:
    cfg = ModelConfig()
    cfg.vision = VisionConfig(pretrained=str(ROOT / "configs/models/dinov2-base"), random_init=True)
    tokenizer = random_word_tokenizer(cfg.text.vocab_size, cfg.text.max_length)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, tokenizer).cuda().eval()
    pixels = torch.randn(256, 3, 224, 224, device="cuda")
    fused = lambda: sdpa_kernel(FUSED)  # noqa: E731
    out = {}
    for name, ctx, compile in (("dynamic", contextlib.nullcontext, False), ("compiled", contextlib.nullcontext, True),
                               ("compiled, fused sdpa only", fused, True),
                               ("compiled, bf16 math sdpa", bf16_math_sdpa, True)):
        out[name] = measure(model, pixels, ctx, compile)
        print(name, json.dumps(out[name]), flush=True)
    fused_ok = "error" not in out["compiled, fused sdpa only"]
    best = "compiled, fused sdpa only" if fused_ok else "compiled, bf16 math sdpa"
    name = best + ", compiled encoder"
    out[name] = measure(model, pixels, fused if "fused" in best else bf16_math_sdpa, True, compile_encoder=True)
    print(name, json.dumps(out[name]), flush=True)
    Path(sys.argv[1] if len(sys.argv) > 1 else "generate_variants.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
