"""Where the phase-1 step's GPU time goes: each part of the model timed alone, compiled, on the step's shapes.

    python bench/step_parts.py --out parts.json             # dinov2-base + default text model, batch 128
    python bench/step_parts.py --tiny --out p.json          # CPU smoke test of the script itself

Each part runs as in the phase-1 step: bf16 autocast, the encoder frozen (no autograd through it), forward and
backward of what trains. A part is timed by the device time of its kernels under the profiler (what the step
pays for it once the host is hidden, as the compiled forward with CUDA graphs nearly does) and by wall time.
Parts: the encoder (as now; with the patch embedding as cuDNN's convolution, and with a separate GELU kernel, as
before; base weights in bf16), the compressor and ITC image head, the text encoder, their momentum copies, the
captioner (image_to_text, GPT-2 with cross-attention, LM loss), ITM (fusion over the 3B pairs and its head, the
hard-negative sampling included), the ITC loss against a full queue, and the momentum update. Each part is
compiled on its own (torch.compile, default mode), so kernels do not fuse across parts as in the whole compiled
forward: the parts add up to a little more than the step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import throughput as T  # noqa: E402  (bench/throughput.py: the model, tokenizer and batches it measures)
from loravl.config import ModelConfig  # noqa: E402
from loravl.losses import itc_loss, lm_loss  # noqa: E402
from loravl.text import encode_text, gather_eos  # noqa: E402
from loravl.vision import PatchProjection  # noqa: E402


def kernel_ms_per_call(fn, calls: int) -> tuple[float, str]:
    """Device time of the kernels ``fn`` launches, per call (0 on the CPU), and a table of its top kernels."""
    if not torch.cuda.is_available():
        return 0.0, ""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events()
             if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70)
    return us / calls / 1e3, table


def conv_patch_projection(model) -> None:
    """The patch embedding back to a plain convolution on the same weights (what transformers runs)."""
    patches = model.vision.model.base_model.model.embeddings.patch_embeddings
    p = patches.projection
    conv = nn.Conv2d(p.in_channels, p.out_channels, p.kernel_size, stride=p.stride, device="meta")
    conv.weight, conv.bias = p.weight, p.bias
    patches.projection = conv


def separate_gelu(model) -> None:
    """Each DINOv2 MLP back to fc1, then a separate GELU kernel, then fc2 (what transformers runs; the encoder
    now fuses fc1 and GELU when frozen under CUDA autocast, ``loravl.vision.GeluMLP``)."""
    for layer in model.vision.model.base_model.model.encoder.layer:
        mlp = layer.mlp
        mlp.forward = lambda hidden, mlp=mlp: mlp.fc2(F.gelu(mlp.fc1(hidden)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--parts", default="", help="a subset of the parts, separated by semicolons (default: all)")
    ap.add_argument("--no_compile", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="step_parts.json")
    ap.add_argument("--tables", default="", help="write each part's top kernels to this file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    timer = T.Timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731

    import tempfile
    from transformers import Dinov2Config

    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        dinov2_dir = tmp.name
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     patch_size=14, image_size=args.image_size).save_pretrained(dinov2_dir)
        tokenizer = T.random_word_tokenizer(400, 16)
    else:
        dinov2_dir = str(T.ROOT / "configs/models/dinov2-base")
        tokenizer = T.random_word_tokenizer(ModelConfig().text.vocab_size, ModelConfig().text.max_length)
    cfg = T.model_config(args, dinov2_dir, "sdpa")
    model = T.build_model(args, cfg, tokenizer, device, compile_encoder=False)
    model.set_lora_trainable(False)  # phase 1
    batch = T.synthetic_batch(args, tokenizer, device)
    pixels, ids, mask, image_ids = (batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_ids"))
    b = pixels.shape[0]

    # The parts' inputs, as the step computes them (fixed here; leaves where the step's autograd flows back).
    with torch.no_grad(), autocast():
        encoder_tokens = model.vision(pixels)
        image = model.encode_image(pixels)
        text = model.encode_text(ids, mask)
        fill = model.queue.size
        model.queue.enqueue(F.normalize(torch.randn(fill, cfg.loss.embed_dim, device=device), dim=-1),
                            F.normalize(torch.randn(fill, cfg.loss.embed_dim, device=device), dim=-1),
                            torch.arange(fill, device=device) + 10**6)
    image_tokens = image["image_tokens"].detach().requires_grad_()
    text_states = text["text_states"].detach().requires_grad_()
    image_feat = image["image_feat"].detach().float().requires_grad_()
    text_feat = text["text_feat"].detach().float().requires_grad_()
    temperature = model.clamped_temperature().detach()
    trainable = [p for _, p in model.trainable_parameters()] + [image_tokens, text_states, image_feat, text_feat]

    # Every part returns what it computes: a compiled function whose result is dropped computes nothing.
    def encoder():
        with torch.no_grad():
            return model.vision(pixels)

    def encoder_bf16_weights():
        with torch.no_grad():
            return model.vision(pixels)  # the encoder in bf16 (see below), under autocast as the trainer runs it

    def compressor_online():
        tokens = model.compressor(encoder_tokens)
        feat = F.normalize(model.vision_proj(model.image_pool(tokens)), dim=-1)
        return tokens.float().square().mean() + feat.float().sum()

    def compressor_momentum():
        with torch.no_grad():
            tokens = model.compressor_m(encoder_tokens)
            return tokens, F.normalize(model.vision_proj_m(model.image_pool_m(tokens)), dim=-1)

    def text_online():
        out = model.encode_text(ids, mask)
        return out["text_states"].float().square().mean() + out["text_feat"].float().sum()

    def text_momentum():
        with torch.no_grad():
            return F.normalize(model.text_proj_m(gather_eos(encode_text(model.text_m, ids, mask), mask)), dim=-1)

    def captioner():
        return lm_loss(model.caption_logits(image_tokens, ids, mask), ids, mask, cfg.loss.label_smoothing)

    def itm():
        return model._itm_batch_negatives({"image_tokens": image_tokens, "image_feat": image_feat.detach()},
                                          {"text_states": text_states, "text_feat": text_feat.detach()},
                                          mask, image_ids, temperature, [b])["loss_itm"]

    def itm_bf16_image_tokens():
        return model._itm_batch_negatives({"image_tokens": image_tokens.to(torch.bfloat16),
                                           "image_feat": image_feat.detach()},
                                          {"text_states": text_states, "text_feat": text_feat.detach()},
                                          mask, image_ids, temperature, [b])["loss_itm"]

    def itc():
        q = model.queue
        image_all = torch.cat([image_feat.detach(), q.image_feats])
        text_all = torch.cat([text_feat.detach(), q.text_feats])
        ids_all = torch.cat([image_ids, q.image_ids])
        candidates = torch.cat([torch.ones_like(image_ids, dtype=torch.bool), q.valid_mask()])
        return itc_loss(image_feat, text_feat, image_all, text_all, image_ids, ids_all, temperature,
                        cfg.loss.distill_alpha, image_feat.detach(), text_feat.detach(), candidates)

    def momentum_update():
        model.momentum_update()  # in place: its writes are kept

    # name: (function, has a backward, runs under autocast)
    parts = {"encoder, separate GELU kernel": (encoder, False, True), "encoder": (encoder, False, True),
             "encoder, cuDNN convolution patch embedding": (encoder, False, True),
             "compressor + ITC image head": (compressor_online, True, True),
             "momentum compressor + image head": (compressor_momentum, False, True),
             "text encoder": (text_online, True, True), "momentum text encoder": (text_momentum, False, True),
             "captioner + LM loss": (captioner, True, True), "ITM: fusion over 3B pairs": (itm, True, True),
             "ITM, image tokens cast to bf16 first": (itm_bf16_image_tokens, True, True),
             "ITC loss, full queue": (itc, True, True), "momentum update": (momentum_update, False, False),
             "encoder, bf16 base weights": (encoder_bf16_weights, False, True)}
    wanted = [p.strip() for p in args.parts.split(";") if p.strip()] or list(parts)
    unknown = [p for p in wanted if p not in parts]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; known: {', '.join(parts)}")

    rows = []
    reference_tokens = None  # the encoder's output with a separate exact GELU: what the others are compared to
    for name in parts:
        if name not in wanted:
            continue
        fn, backward, under_autocast = parts[name]
        # Each encoder variant changes one thing against the encoder as it is now, and is undone after.
        patches = model.vision.model.base_model.model.embeddings.patch_embeddings
        patches.projection = PatchProjection.from_conv(patches.projection)
        for layer in model.vision.model.base_model.model.encoder.layer:
            layer.mlp.__dict__.pop("forward", None)
        if name == "encoder, cuDNN convolution patch embedding":
            conv_patch_projection(model)
        if name == "encoder, separate GELU kernel":
            separate_gelu(model)
        if name == "encoder, bf16 base weights":  # last: it changes the model
            model.vision.to(torch.bfloat16 if dtype is not None else torch.float32)
        compiled = fn if args.no_compile else torch.compile(fn)

        def call():
            if under_autocast:
                with autocast():
                    loss = compiled()
            else:
                loss = compiled()
            if backward:
                loss.backward()
                for p in trainable:
                    p.grad = None

        try:
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                call()
            timer.sync()
            warmup_s = time.perf_counter() - t0
            t = timer(call, warmup=1, iters=args.iters)
            kernel_ms, table = kernel_ms_per_call(call, 5)
            row = {"name": name, "kernel_ms": kernel_ms, "wall_ms": 1e3 * t["median_s"], "warmup_s": warmup_s}
            if name.startswith("encoder"):
                # How far each variant's tokens are from the exact-GELU, fp32-weight encoder's (the plain
                # transformers computation under autocast): relative L2 error and largest difference.
                with torch.no_grad(), autocast():
                    tokens = compiled().float()
                if name == "encoder, separate GELU kernel":
                    reference_tokens = tokens
                if reference_tokens is not None:
                    row["relative_error_vs_exact_gelu"] = float((tokens - reference_tokens).norm()
                                                                / reference_tokens.norm())
                    row["max_abs_diff_vs_exact_gelu"] = float((tokens - reference_tokens).abs().max())
            if args.tables:
                with open(args.tables, "a") as f:
                    f.write(f"## {name}: {kernel_ms:.3f} ms of kernels per call\n{table}\n\n")
        except Exception as e:  # one failing part must not lose the others
            row = {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                              else "cpu", "torch": torch.__version__, "batch_size": b,
                                              "rows": rows}, indent=2))

    print(f"\n{'part (phase 1, forward + backward of what trains)':<52}{'kernel ms':>11}{'wall ms':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<52} FAILED {r['error'][:150]}")
        else:
            print(f"{r['name']:<52}{r['kernel_ms']:>11.3f}{r['wall_ms']:>10.3f}")


if __name__ == "__main__":
    main()
