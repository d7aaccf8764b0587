"""Throughput of the real stage-1 training step and its ceilings, measured in one run on one GPU.

    python bench/throughput.py --out throughput.json            # dinov2-base + default text model, batch 128
    python bench/throughput.py --tiny --steps 2 --out t.json    # CPU smoke test of the script itself

Sections (each printed as a table row and written to JSON):
  matmul      bf16 8192^3 matrix product: the arithmetic ceiling MFU is measured against
  encoder     DINOv2 alone: forward-only (phase-1 floor) and LoRA forward+backward (phase-2), SDPA and compiled
  step        the full step (3 losses, backward, clip, fused AdamW) in phase 1 and 2: optimised
              (bf16, SDPA, compiled encoder) and the naive baseline (fp32, eager attention, no compile)
  loader      phase-1 step fed by the real data loader from JPEG files on disk vs synthetic tensors, with the
              cores the training process and the workers used; --loader_repeats: that row again, each paired
              with a synthetic row, and their losses' median; --loader_variants: other worker counts,
              niceness, or the JPEGs' copy shrunk by loravl.data.shrink (15@317: a loader-alone row too), fed
              to the same compiled step
  generate    greedy captioning, batch 256, 30 new tokens
The model is built with random weights from the dinov2-base config shipped in configs/models (no download).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402  (the step variants' inductor options)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import Dinov2Config  # noqa: E402

from loravl.config import DataConfig, ModelConfig, VisionConfig, TextConfig  # noqa: E402
from loravl.model import VisionLanguageModel  # noqa: E402
from loravl.text import CaptionTokenizer, train_tokenizer  # noqa: E402
from loravl.train import INPUT_KEYS, allocate_grads, to_device  # noqa: E402

import cpu_use  # noqa: E402  (bench/)


_rng = random.Random(0)
WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 9))) for _ in range(40000)]


def random_word_tokenizer(vocab_size: int, max_length: int) -> CaptionTokenizer:
    """A BPE of the requested size trained, as the trainer trains one, on a caption corpus: captions of the common
    words (each then one token, as COCO's words mostly are) and the rare words to fill the vocabulary. Captions of
    ``random_captions`` come out at ~13 tokens, padded to 24 per batch of 128: what the trainer's tokenizer gives
    them, and about COCO's length. (In BENCHMARKS.md's runs 1-6 the corpus had each word once: BPE split every
    word, and the captions were ~34 tokens, padded to 40.)"""
    corpus = [*random_captions(20000, seed=-1), *(" ".join(WORDS[i:i + 8]) for i in range(2000, len(WORDS), 8))]
    return CaptionTokenizer(train_tokenizer(corpus, vocab_size), max_length)


def random_captions(n: int, seed: int) -> list[str]:
    """COCO-length captions (8-14 words, COCO averages ~10.5) from the tokenizer's common words."""
    rng = random.Random(seed)
    common = WORDS[:2000]
    return [" ".join(rng.choice(common) for _ in range(rng.randint(8, 14))) for _ in range(n)]


class Timer:
    """Median and mean seconds per call over ``iters`` calls after ``warmup``, with CUDA events on a GPU.

    Each timed call waits for the GPU to finish, so the host cannot run ahead: that is a step's latency. With
    ``pipelined`` the same number of calls also runs back to back, one wait at the end (``pipelined_s`` per call),
    as the trainer runs its steps (it reads its metrics back every few steps): the host prepares the next step
    while the GPU computes this one, and that rate is what a training run gets.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, warmup: int, iters: int, pipelined: bool = False) -> dict:
        for _ in range(warmup):
            fn()
        self.sync()
        extra = {}
        if pipelined:
            self.sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            self.sync()
            extra["pipelined_s"] = (time.perf_counter() - t0) / iters
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "iters": iters, **extra}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def model_config(args, dinov2_dir: str, attn: str) -> ModelConfig:
    cfg = ModelConfig()
    cfg.vision = VisionConfig(pretrained=dinov2_dir, random_init=True, image_size=args.image_size,
                              attn_implementation=attn)
    if args.tiny:
        cfg.compressor.hidden_dim, cfg.compressor.embed_dim = 24, 16
        cfg.text = TextConfig(vocab_size=400, max_length=16, num_layers=1, hidden_size=32, num_heads=2)
        cfg.fusion.num_heads = 2
        cfg.loss.embed_dim, cfg.loss.queue_size = 16, 64
    return cfg


def build_model(args, cfg: ModelConfig, tokenizer, device, compile_encoder: bool,
                compile_model: bool = False, model_mode: str = "default",
                encoder_mode: str = "default", model_scope: str = "modules",
                frozen_dtype: Optional[torch.dtype] = None,
                prefix_split: bool = False) -> VisionLanguageModel:
    """``*_mode``: torch.compile's mode for the model (``model_scope``: its heavy submodules, or the whole training
    forward) and for the encoder alone. ``frozen_dtype``: store the frozen encoder weights in it, as the trainer
    does under bf16 on a GPU. ``prefix_split``: the encoder's attention with CLS kept out of the fused kernel
    (bench/prefix_split.py; the package's from 2026-12-01's ninth session to 2026-12-02's fourteenth)."""
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, tokenizer).to(device).train()
    if prefix_split and cfg.vision.attn_implementation == "sdpa":
        from prefix_split import use_prefix_split

        use_prefix_split(model.vision.model.base_model.model)
    if frozen_dtype is not None:
        model.vision.store_frozen_weights(frozen_dtype)
    if compile_model:
        model.compile(scope=model_scope, mode=model_mode)
    if compile_encoder:
        model.vision.model.compile(mode=encoder_mode)  # in place: parameter names (and checkpoints) unchanged
    return model


def synthetic_batch(args, tokenizer, device, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = args.batch_size
    tokens = tokenizer(random_captions(b, seed))
    # uint8 RGB, channels-last in memory, as the loader gives it (the encoder normalises on the device): the
    # loader-fed rows then run the same compiled graph
    pixels = torch.randint(0, 256, (b, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=g)
    batch = {"pixel_values": pixels.permute(0, 3, 1, 2),
             "image_ids": torch.arange(b) + seed * b, **tokens}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(model, device, lr=1e-4):
    params = [p for _, p in model.trainable_parameters()]
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


def train_step(model, optimizer, batch, autocast_dtype, graphs: bool = False):
    """What the trainer does per step of one micro-batch: autocast forward, backward, clip, optimizer step.
    ``graphs``: keep gradient buffers allocated and accumulate into them, as the trainer does with CUDA graphs and
    several micro-batches (loravl.train.allocate_grads says why); with one micro-batch it does not."""
    params = [p for _, p in model.trainable_parameters()]
    if graphs:
        allocate_grads(params)
    # A new step for CUDA graphs (compile mode reduce-overhead): the last step's graph outputs may be reused.
    torch.compiler.cudagraph_mark_step_begin()
    record = torch.profiler.record_function  # labels for profile_step; nothing when not profiling
    with record("step: forward"), torch.autocast(batch["pixel_values"].device.type, dtype=autocast_dtype,
                                                 enabled=autocast_dtype is not None):
        out = model(**batch)
    with record("step: backward"):
        out["loss"].backward()
    with record("step: clip + optimizer"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphs)
    return out


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profile_step(model, optimizer, batch, dtype, path: Path, graphs: bool, label_parts: bool = True) -> None:
    """Where one step's time goes: the top operators by device time and by host time, and the forward's device
    time by part of the model (labelled ranges ``fwd: ...``, outside the compiled regions). ``label_parts``:
    False for a whole compiled forward (its parts are inside one graph; relabelling would retrace it)."""
    import loravl.model as model_module

    if not label_parts:
        profile_calls(lambda: train_step(model, optimizer, batch, dtype, graphs), path)
        return

    def labelled(fn, label):
        def call(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return call

    # Instance attributes shadow the methods; the module-level encode_text is the momentum and queue text pass
    # (model.encode_text, the online one, is labelled on its own and nests it).
    patched = {"encode_image": "fwd: vision encoder + compressor + ITC image head",
               "encode_text": "fwd: text encoder (online)", "itm_logits": "fwd: fusion + ITM head (3B pairs)",
               "caption_logits": "fwd: captioner", "momentum_update": "fwd: momentum update"}
    for name, label in patched.items():
        setattr(model, name, labelled(getattr(model, name), label))
    model.vision.forward = labelled(model.vision.forward, "fwd: vision encoder")
    original_encode_text = model_module.encode_text
    model_module.encode_text = labelled(original_encode_text, "fwd: text pass (any, incl. momentum)")
    try:
        profile_calls(lambda: train_step(model, optimizer, batch, dtype, graphs), path)
    finally:
        model_module.encode_text = original_encode_text
        for name in [*patched, "forward"]:
            target = model.vision if name == "forward" else model
            target.__dict__.pop(name, None)


def profile_calls(fn, path: Path, calls: int = 4) -> None:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - t0
    table = prof.key_averages()
    cuda = torch.cuda.is_available()
    from torch.autograd import DeviceType
    kernels_us = sum(e.time_range.elapsed_us() for e in prof.events()
                     if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    # Labelled ranges: device time of the kernels launched inside each (CUDA-graph replays included), per call.
    lines = [f"per call, under the profiler: {wall_s / calls * 1e3:.3f} ms wall, {kernels_us / calls / 1e3:.3f} ms of "
             f"device kernels ({calls} calls)",
             f"{'labelled range':<60}{'calls':>7}{'device ms/call':>16}{'host ms/call':>14}"]
    for e in sorted((e for e in table if e.key.startswith(("step:", "fwd:"))), key=lambda e: e.key):
        device_ms, host_ms = ((e.device_time_total if cuda else 0.0) / max(e.count, 1) / 1e3,
                              e.cpu_time_total / max(e.count, 1) / 1e3)
        lines.append(f"{e.key:<60}{e.count:>7}{device_ms:>16.3f}{host_ms:>14.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if cuda:  # the calls ran back to back: where the GPU waited between and inside them (bench/trace_gaps.py)
        import gzip
        import shutil

        import trace_gaps

        trace = path.with_suffix(".json")
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        lines += ["", trace_gaps.report(trace_gaps.analyse(trace_gaps.load_events(Path(f"{trace}.gz")), 5.0, 2.0),
                                        calls, 25)]
    path.write_text("\n".join(lines) + "\n\n" + table.table(sort_by=sort, row_limit=40, max_name_column_width=60)
                    + "\n\n" + table.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    print("\n".join(lines), flush=True)


# The frozen encoder's fc1 + GELU runs as one cuBLASLt call (loravl.vision.GeluMLP), which the FLOP counter does
# not know: count it as the matrix product it is, so that the step's FLOPs do not depend on which kernel runs.
if torch.ops.aten._addmm_activation not in torch.utils.flop_counter.flop_registry:
    torch.utils.flop_counter.register_flop_formula(torch.ops.aten._addmm_activation, get_raw=True)(
        torch.utils.flop_counter.addmm_flop)


def count_step_flops(model, optimizer, batch, autocast_dtype) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, batch, autocast_dtype)
    return counter.get_total_flops()


def bench_matmul(timer, device, args) -> dict:
    n = 1024 if args.tiny else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timer(lambda: a @ b, warmup=3, iters=10)
    return {"tflops": 2 * n**3 / t["median_s"] / 1e12, **t}


def bench_encoder(timer, device, args, cfg, tokenizer) -> list[dict]:
    rows = []
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    modes = [None if m == "none" else m for m in args.encoder_modes.split(",")] if not args.no_compile else [None]
    suffixes = {None: "", "default": " compiled", "reduce-overhead": " compiled, CUDA graphs"}
    for mode in modes:
        model = build_model(args, cfg, tokenizer, device, compile_encoder=mode is not None,
                            encoder_mode=mode or "default")
        encoder = model.vision

        def forward_only(inputs=pixels, autocast=True):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast and dtype is not None):
                encoder(inputs)

        # Phase 1 as the trainer runs it: LoRA frozen at B = 0, so its path is switched off.
        reset_peak(device)
        t = timer(forward_only, warmup=args.warmup, iters=args.steps)
        rows.append({"name": f"encoder forward{suffixes[mode]}", "images_per_s":
                     args.batch_size / t["median_s"], "peak_gib": peak_memory_gib(device),
                     "lora_path": encoder.adapter_path_on, **t})
        # The same with the frozen LoRA path computed (what phase 1 cost before it was switched off; a trained
        # LoRA at inference costs this): B set to a tiny non-zero value.
        lora_b = [p for n, p in encoder.lora_parameters() if ".lora_B." in n]
        with torch.no_grad():
            for p in lora_b:
                p.fill_(1e-8)
        reset_peak(device)
        t = timer(forward_only, warmup=args.warmup, iters=args.steps)
        rows.append({"name": f"encoder forward{suffixes[mode]}, frozen LoRA path computed", "images_per_s":
                     args.batch_size / t["median_s"], "peak_gib": peak_memory_gib(device),
                     "lora_path": encoder.adapter_path_on, **t})
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
        encoder.set_lora_trainable(True)
        opt = torch.optim.AdamW([p for _, p in encoder.lora_parameters()], lr=1e-4, fused=device.type == "cuda")

        def lora_forward_backward():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = encoder(pixels).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_peak(device)
        t = timer(lora_forward_backward, warmup=args.warmup, iters=args.steps)
        rows.append({"name": f"encoder LoRA fwd+bwd{suffixes[mode]}", "images_per_s":
                     args.batch_size / t["median_s"], "peak_gib": peak_memory_gib(device), **t})
        if dtype is not None:
            # The frozen encoder with its weights stored in bf16 (no autocast, so a bf16 residual stream too):
            # what a plain bf16 DINOv2 costs, beside the trainer's fp32 weights under autocast.
            del opt
            encoder.set_lora_trainable(False)
            with torch.no_grad():
                for p in lora_b:
                    p.zero_()
            encoder.to(dtype)
            pixels_low = pixels.to(dtype)
            reset_peak(device)
            t = timer(lambda: forward_only(pixels_low, autocast=False), warmup=args.warmup, iters=args.steps)
            rows.append({"name": f"encoder forward{suffixes[mode]}, bf16 weights", "images_per_s":
                         args.batch_size / t["median_s"], "peak_gib": peak_memory_gib(device),
                         "lora_path": encoder.adapter_path_on, **t})
    return rows


def bench_steps(timer, device, args, tokenizer, dinov2_dir, matmul_tflops) -> list[dict]:
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    # FLOPs per step, counted once on an uncompiled model: the same whichever kernels compute them.
    model = build_model(args, model_config(args, dinov2_dir, "sdpa"), tokenizer, device, compile_encoder=False)
    batch = synthetic_batch(args, tokenizer, device)
    step_flops = {}
    for phase in args.phases:
        model.set_lora_trainable(phase == 2)
        step_flops[phase] = count_step_flops(model, make_optimizer(model, device), batch, bf16)
    del model

    rows = []
    compile_ok = not args.no_compile
    fast = "bf16" if bf16 is not None else "fp32"  # no bf16 autocast on the CPU
    # name: (label, attention, autocast dtype, compile encoder, compile model, model mode, encoder mode, model scope)
    ro = "reduce-overhead"  # CUDA graphs: one launch per compiled graph instead of one per kernel
    known = {"compiled": (f"{fast} compiled model", "sdpa", bf16, True, True, "default", "default", "modules"),
             "compiled_ro_encoder": (f"{fast} compiled model, CUDA-graph encoder", "sdpa", bf16, True, True,
                                     "default", ro, "modules"),
             "compiled_ro": (f"{fast} compiled model, CUDA graphs", "sdpa", bf16, True, True, ro, ro, "modules"),
             # The whole training forward as one graph (compile scope forward); the encoder is inside it.
             "forward": (f"{fast} compiled forward", "sdpa", bf16, False, True, "default", "default", "forward"),
             "forward_ro": (f"{fast} compiled forward, CUDA graphs", "sdpa", bf16, False, True, ro, ro, "forward"),
             # The same with gradient buffers kept and accumulated into (the trainer with several micro-batches,
             # and with one before 2026-12-01's third session): one add kernel per trainable tensor.
             "forward_ro_buffers": (f"{fast} compiled forward, CUDA graphs, gradient buffers", "sdpa", bf16, False,
                                    True, ro, ro, "forward"),
             # The frozen encoder weights kept in fp32 and cast under autocast every step (the trainer before
             # 2026-12-01's fourth session; every other bf16 variant stores them in bf16, as the trainer now does).
             "forward_ro_fp32_frozen": (f"{fast} compiled forward, CUDA graphs, fp32 frozen weights", "sdpa", bf16,
                                        False, True, ro, ro, "forward"),
             # The frozen encoder's attention with CLS kept out of the fused kernel (bench/prefix_split.py); every
             # other sdpa variant runs one SDPA kernel over all 257 tokens, as the trainer does.
             "forward_ro_prefix_split": (f"{fast} compiled forward, CUDA graphs, prefix split attention", "sdpa",
                                         bf16, False, True, ro, ro, "forward"),
             # max-autotune: GEMMs autotuned against Triton templates (which can fuse their epilogues, the GELU
             # after fc1 say), CUDA graphs too; compiles for much longer.
             "forward_ma": (f"{fast} compiled forward, max-autotune", "sdpa", bf16, False, True, "max-autotune",
                            "max-autotune", "forward"),
             # The same with an inductor option (INDUCTOR_VARIANTS): launches of independent small kernels
             # combined into one, or each Triton kernel's launch configuration tuned by coordinate descent.
             "forward_ro_combo_kernels": (f"{fast} compiled forward, CUDA graphs, combo kernels", "sdpa", bf16,
                                          False, True, ro, ro, "forward"),
             "forward_ro_coordinate_descent": (f"{fast} compiled forward, CUDA graphs, coordinate descent tuning",
                                               "sdpa", bf16, False, True, ro, ro, "forward"),
             "compiled_encoder": (f"{fast} compiled encoder", "sdpa", bf16, True, False, "default", "default",
                                  "modules"),
             "sdpa": (f"{fast} sdpa, no compile", "sdpa", bf16, False, False, "default", "default", "modules"),
             "naive": ("naive fp32 eager", "eager", None, False, False, "default", "default", "modules")}
    names = args.step_variants.split(",") if compile_ok else ["sdpa", "naive"]  # --no_compile: nothing compiled
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--step_variants: unknown {unknown}; known: {', '.join(known)}")
    profiled = args.profile_variants.split(",") if args.profile_variants else names[:1]
    for name in names:
        label, attn, dtype, compile_encoder, compile_model, model_mode, encoder_mode, scope = known[name]
        before = len(rows)
        try:  # rows are appended phase by phase, so a failing phase keeps the figures before it
            with torch._inductor.config.patch(INDUCTOR_VARIANTS.get(name, {})):  # read when each graph compiles
                bench_step_variant(timer, device, args, tokenizer, dinov2_dir, matmul_tflops, step_flops, rows,
                                   label, attn, dtype, compile_encoder, compile_model, model_mode, encoder_mode, scope,
                                   profile=name in profiled, grad_buffers=name.endswith("_buffers"),
                                   frozen_dtype=None if name.endswith("_fp32_frozen") else dtype,
                                   prefix_split=name.endswith("_prefix_split"))
        except Exception as e:  # one failing variant must not lose the others' figures
            rows.append({"name": f"step {label} FAILED", "error": f"{type(e).__name__}: {str(e)[:400]}"})
        for row in rows[before:]:
            print(json.dumps(row), flush=True)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))
    return rows


INDUCTOR_VARIANTS = {"forward_ro_combo_kernels": {"combo_kernels": True},
                     "forward_ro_coordinate_descent": {"coordinate_descent_tuning": True}}


def bench_step_variant(timer, device, args, tokenizer, dinov2_dir, matmul_tflops, step_flops, rows, label, attn,
                       dtype, compile_encoder, compile_model, model_mode, encoder_mode, scope, profile,
                       grad_buffers=False, frozen_dtype=None, prefix_split=False) -> None:
    model = build_model(args, model_config(args, dinov2_dir, attn), tokenizer, device,
                        compile_encoder=compile_encoder, compile_model=compile_model, model_mode=model_mode,
                        encoder_mode=encoder_mode, model_scope=scope, frozen_dtype=frozen_dtype,
                        prefix_split=prefix_split)
    batches = [synthetic_batch(args, tokenizer, device, seed=s) for s in range(4)]
    for phase in args.phases:
        model.set_lora_trainable(phase == 2)
        optimizer = make_optimizer(model, device)
        counter = iter(range(10**9))
        reset_peak(device)
        modes = {model_mode if compile_model else None, encoder_mode if compile_encoder else None}
        graphs = grad_buffers and bool({"reduce-overhead", "max-autotune"} & modes)
        t = timer(lambda: train_step(model, optimizer, batches[next(counter) % 4], dtype, graphs),
                  warmup=args.warmup, iters=args.steps, pipelined=True)
        rows.append({"name": f"step phase {phase} {label}", "images_per_s": args.batch_size / t["pipelined_s"],
                     "synced_images_per_s": args.batch_size / t["median_s"], "peak_gib": peak_memory_gib(device),
                     "step_tflop": step_flops[phase] / 1e12,
                     "mfu": step_flops[phase] / t["pipelined_s"] / (matmul_tflops * 1e12), **t})
        if args.profile_dir and profile:
            name = "" if scope == "modules" else "_forward"
            profile_step(model, optimizer, batches[0], dtype,
                         Path(args.profile_dir) / f"profile_phase{phase}{name}.txt", graphs,
                         label_parts=not (compile_model and scope == "forward"))


def write_jpegs(folder: Path, n: int, size=(640, 480)) -> None:
    """Real-size JPEGs with content (noise + shapes), written by several processes."""
    from concurrent.futures import ProcessPoolExecutor
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(16, os.cpu_count() or 1)
    chunks = [(folder, i, min(i + 500, n), size) for i in range(0, n, 500)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, chunks))
    with open(folder / "manifest.jsonl", "w") as f:
        for i, caption in enumerate(random_captions(n, seed=1)):
            f.write(json.dumps({"image": f"img{i:06d}.jpg", "caption": caption}) + "\n")


def ensure_jpegs(folder: Path, n: int) -> Path:
    """The manifest of at least ``n`` of the bench's JPEGs in ``folder``, written unless there already."""
    manifest = folder / "manifest.jsonl"
    if not manifest.exists() or sum(1 for _ in open(manifest)) < n:
        write_jpegs(folder, n)
    return manifest


def encoded_jpegs(folder: Path, n: int) -> list[torch.Tensor]:
    """``n`` of the bench's JPEGs in ``folder`` (written if missing) read back as uint8 tensors of their bytes, what
    ``torchvision.io.decode_jpeg`` takes (bench/gpu_decode_*.py)."""
    ensure_jpegs(folder, n)
    return [torch.frombuffer(bytearray((folder / f"img{i:06d}.jpg").read_bytes()), dtype=torch.uint8)
            for i in range(n)]


def gpu_crops(images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """Same-size decoded uint8 images on the GPU -> each box's crop resized to 224, uint8: ``roi_align`` over the
    batch (bilinear, not antialiased), the GPU crop the nvJPEG probes time (bench/gpu_decode_*.py)."""
    from torchvision.ops import roi_align
    x = torch.stack(images).float()
    return roi_align(x, boxes, output_size=224, sampling_ratio=2, aligned=True).round_().clamp_(0, 255).to(torch.uint8)


def probe_batches(batch: int, device: torch.device) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """The nvJPEG overlap probes' input: 2,048 of the bench's JPEGs as encoded bytes in batches, and the batch's
    crop boxes on ``device``."""
    files = encoded_jpegs(Path("/tmp/probe_jpegs"), 2048)
    return [files[i:i + batch] for i in range(0, len(files), batch)], crop_boxes(batch, device)


def crop_boxes(batch: int, device: torch.device) -> torch.Tensor:
    """The probes' crop of each 640x480 JPEG of a batch: ``gpu_crops``' boxes [index, x1, y1, x2, y2]."""
    return torch.tensor([[i, 10., 20., 510., 420.] for i in range(batch)], device=device)


def _write_chunk(job):
    import numpy as np
    from PIL import Image
    folder, start, stop, size = job
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BILINEAR)
        img.save(folder / f"img{i:06d}.jpg", quality=90)


def loader_alone_row(dataset, data_cfg: DataConfig, args, tokenizer, name: str = "") -> dict:
    """The loader alone, into pinned batches of 224 px tensors, at its steady rate: batches taken as fast as they
    come, timed after the first two per worker (the workers' start). Its workers exit after."""
    from loravl.data import build_dataloader
    loader = build_dataloader(dataset, data_cfg, args.batch_size, train=True, seed=0, tokenize=tokenizer)
    n_batches = min(args.loader_batches, len(dataset) // args.batch_size)
    it = iter(loader)
    stamps, cpu = [], []
    skip = min(2 * data_cfg.num_workers, n_batches // 2)
    for k in range(n_batches):
        next(it)
        stamps.append(time.perf_counter())
        if k in (skip, n_batches - 1):
            cpu.append(cpu_use.snapshot())
    del it, loader
    gc.collect()
    loader_s = (stamps[-1] - stamps[skip]) / (n_batches - 1 - skip)
    return {"name": f"loader alone ({data_cfg.num_workers} workers){name}, steady",
            "images_per_s": args.batch_size / loader_s, "mean_s": loader_s, "batches_timed": n_batches - 1 - skip,
            **cpu_use.cores_used(*cpu)}


def shrunk_copy(folder: Path, short_side: int, rows: list[dict]) -> Path:
    """The manifest of ``folder``'s copy with its images shrunk to ``short_side`` (loravl.data.shrink), written
    unless there already; a row says how long it took."""
    from loravl.data.shrink import ShrinkSettings, shrink_tree
    target = folder.with_name(f"{folder.name}_shrunk{short_side}")
    report = shrink_tree(folder, target, ShrinkSettings(short_side))
    rows.append({"name": f"shrink to {short_side} px: {report.summary()}", "seconds": report.seconds,
                 "outcomes": dict(report.outcomes), "bytes_in": report.bytes_in, "bytes_out": report.bytes_out})
    print(json.dumps(rows[-1]), flush=True)
    return target / "manifest.jsonl"


def bench_loader(timer, device, args, tokenizer, dinov2_dir) -> list[dict]:
    from loravl.data import build_dataloader, build_dataset
    folder = Path(args.jpeg_dir or tempfile.mkdtemp()) / "jpegs"
    t0 = time.perf_counter()
    ensure_jpegs(folder, args.num_jpegs)
    write_s = time.perf_counter() - t0
    data_cfg = DataConfig(format="jsonl", train_path=str(folder / "manifest.jsonl"), num_workers=args.workers,
                          prefetch_factor=4)
    dataset = build_dataset(data_cfg, "train", args.image_size)
    loader = build_dataloader(dataset, data_cfg, args.batch_size, train=True, seed=0, tokenize=tokenizer)
    rows = [{**loader_alone_row(dataset, data_cfg, args, tokenizer), "jpeg_write_s": write_s}]
    per_epoch = len(dataset) // args.batch_size

    # The fastest step (compiled forward, CUDA graphs on a GPU) fed by the loader, then by synthetic tensors: the
    # same model in the same run, so the difference is the loader's.
    cfg = model_config(args, dinov2_dir, "sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    compile_model = not args.no_compile
    graphs = compile_model and device.type == "cuda"
    mode = "reduce-overhead" if graphs else "default"
    # The trainer's defaults: the whole forward compiled, the frozen weights in bf16 on a GPU.
    model = build_model(args, cfg, tokenizer, device, compile_encoder=False, compile_model=compile_model,
                        model_mode=mode, model_scope="forward",
                        frozen_dtype=torch.bfloat16 if device.type == "cuda" else None)
    optimizer = make_optimizer(model, device)

    def step_from_loader(_=None):  # copied to the GPU as the trainer copies its batches
        train_step(model, optimizer, to_device(next(it), INPUT_KEYS, device), dtype)

    it = iter(loader)
    # Loader batches pad captions to several widths, each compiled once: a longer warm-up.
    warmup = max(args.warmup, 10)
    for _ in range(warmup):
        step_from_loader()
    batches = [synthetic_batch(args, tokenizer, device, seed=s) for s in range(4)]
    for batch in batches:  # their caption widths compiled too, before any timed row
        train_step(model, optimizer, batch, dtype)
    timer.sync()
    # While compiling, the workers filled the loader's prefetch queue (workers x prefetch_factor batches). Timed
    # from that full queue, a step would not wait for decoding until the queue ran dry. Emptied first, every batch
    # the timed steps take is one the workers have just made, as in a long run.
    queued = args.workers * data_cfg.prefetch_factor
    for _ in range(min(queued, per_epoch - warmup - 2)):
        next(it)
    left = per_epoch - warmup - queued
    if left < 3:
        raise SystemExit(f"--num_jpegs: {len(dataset)} images leave {left} batches to time after the warm-up "
                         f"({warmup}) and the emptied queue ({queued}); give more")
    iters = min(max(args.steps, 3), left)  # 3 steps at least (the smoke test in the docstring asks for 2)
    label = "compiled forward, CUDA graphs" if graphs else ("compiled forward" if compile_model else "eager")

    def timed_row(name: str, n: int, step=step_from_loader, fed_by="fed by JPEG loader") -> dict:
        """``n`` steps, back to back (from the loader unless ``step`` says otherwise): img/s and where the host's
        cores went meanwhile."""
        before = cpu_use.snapshot()
        t0 = time.perf_counter()
        for k in range(n):
            step(k)
        timer.sync()
        step_s = (time.perf_counter() - t0) / n
        return {"name": f"step phase 1 {label}, {fed_by}{name}", "images_per_s": args.batch_size / step_s,
                "pipelined_s": step_s, "iters": n, **cpu_use.cores_used(before, cpu_use.snapshot())}

    rows.append(timed_row(" (queue emptied first)", iters))
    # --loader_repeats: the loader-fed row and a synthetic row right after it, as pairs. The loader-fed rate
    # varied 17% from row to row on one host (BENCHMARKS.md, eighth session), more than the 10% the target
    # allows, so one row cannot judge it; the median of the pairs' losses can. Each repeat is a new epoch of
    # the same loader, its queue emptied first. Before a synthetic row the workers get the time to refill their
    # queue (1.5x what the loader alone took for as many batches), so that they do not take cores from it.
    if args.loader_repeats > 1:
        fed, losses = [], []
        refill_s = 1.5 * queued * args.batch_size / rows[0]["images_per_s"]
        for repeat in range(1, args.loader_repeats + 1):
            if repeat > 1:
                loader.set_epoch(repeat - 1)
                it = iter(loader)
                for _ in range(queued):
                    next(it)
                rows.append(timed_row(f" (queue emptied first), repeat {repeat}",
                                      min(args.steps, per_epoch - queued - 2)))
            fed.append(rows[-1]["images_per_s"])
            time.sleep(refill_s)
            rows.append(timed_row(f", after repeat {repeat}", rows[-1]["iters"],
                                  step=lambda k: train_step(model, optimizer, batches[k % 4], dtype),
                                  fed_by="synthetic tensors"))
            losses.append(1 - fed[-1] / rows[-1]["images_per_s"])
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
        rows.append({"name": f"step phase 1 {label}, fed by JPEG loader: median of {len(losses)} repeats, "
                             f"{statistics.median(losses):.1%} lost against synthetic",
                     "images_per_s": statistics.median(fed), "pipelined_s": args.batch_size / statistics.median(fed),
                     "lost_against_synthetic_median": statistics.median(losses),
                     "lost_against_synthetic_each": losses})
    # The same compiled step fed by other loaders: another worker count, workers at a lower scheduling priority
    # (niceness) than this process, so that the process launching the GPU's work gets a core at once, or the
    # JPEGs' copy shrunk to a short side by loravl.data.shrink (src/shrink_images.py), made once per size.
    shrunk: dict[int, Path] = {}  # short side -> the copy's manifest
    for variant in filter(None, args.loader_variants.split(",")):
        variant, _, short_side = variant.partition("@")
        workers, _, nice = variant.partition(":nice")
        del it, loader
        gc.collect()  # the previous loader's workers exit
        variant_dataset, variant_cfg = dataset, dataclasses.replace(data_cfg, num_workers=int(workers))
        if short_side:
            if int(short_side) not in shrunk:
                shrunk[int(short_side)] = shrunk_copy(folder, int(short_side), rows)
            variant_cfg = dataclasses.replace(variant_cfg, train_path=str(shrunk[int(short_side)]))
            variant_dataset = build_dataset(variant_cfg, "train", args.image_size)
            rows.append(loader_alone_row(variant_dataset, variant_cfg, args, tokenizer,
                                         f" on the copy shrunk to {short_side} px"))
            print(json.dumps(rows[-1]), flush=True)
        loader = build_dataloader(variant_dataset, variant_cfg, args.batch_size, train=True, seed=1,
                                  tokenize=tokenizer)
        known = set(cpu_use.descendants(os.getpid()))
        it = iter(loader)
        next(it)
        for pid in set(cpu_use.descendants(os.getpid())) - known if nice else ():
            os.setpriority(os.PRIO_PROCESS, pid, int(nice))
        start_up = int(workers) * data_cfg.prefetch_factor
        for _ in range(start_up):
            next(it)
        rows.append(timed_row(f", {workers} workers" + (f" at niceness {nice}" if nice else "")
                              + (f", copy shrunk to {short_side} px" if short_side else ""),
                              min(args.steps, per_epoch - start_up - 2)))
        print(json.dumps(rows[-1]), flush=True)  # each as it comes: a long list may outlast a time limit
    counter = iter(range(10**9))
    before = cpu_use.snapshot()  # the loader's workers idle meanwhile, their prefetch queue full
    t = timer(lambda: train_step(model, optimizer, batches[next(counter) % 4], dtype), warmup=args.warmup,
              iters=max(iters, 10), pipelined=True)
    rows.append({"name": f"step phase 1 {label}, synthetic tensors", "images_per_s": args.batch_size / t["pipelined_s"],
                 "synced_images_per_s": args.batch_size / t["median_s"], **t,
                 **cpu_use.cores_used(before, cpu_use.snapshot())})
    return rows


def bench_generate(timer, device, args, cfg, tokenizer) -> list[dict]:
    """Greedy captioning as ``generate_captions.py`` runs it: transformers' generate() with a dynamic cache, and
    with ``compile`` (static caches, decoding step compiled with CUDA graphs by generate()), in the same run."""
    model = build_model(args, cfg, tokenizer, device, compile_encoder=False).eval()
    with torch.no_grad():  # a trained LoRA (B non-zero), so that the encoder computes its path as it would
        for n, p in model.vision.lora_parameters():
            if ".lora_B." in n:
                p.normal_(std=1e-3)
    b = 256 if not args.tiny else 4
    pixels = torch.randn(b, 3, args.image_size, args.image_size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    # (label, compile=, encoder compiled by generate(compile=True)). Merging LoRA into the encoder's weights
    # (PEFT merge_adapter) measured nothing in run 7 (BENCHMARKS.md) and is no longer run.
    for label, compiled, compile_encoder in (("", False, False),
                                             (", compiled decoding, eager encoder", True, False),
                                             (", compiled", True, True)):
        # generate(compile=True) compiles the encoder once unless told it is compiled already: the eager-encoder
        # row runs first and sets that flag itself, so both rows run on the same model in one process.
        model._image_path_compiled = not compile_encoder

        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                # min_new_tokens: a random model may emit <eos> early; time all 30 tokens
                model.generate(pixels, max_new_tokens=30, min_new_tokens=30, compile=compiled)

        try:
            t = timer(run, warmup=3 if compiled else 1, iters=max(2, args.steps // 4))
            rows.append({"name": f"generate greedy b={b} 30 tokens{label}", "images_per_s": b / t["median_s"], **t})
        except Exception as e:  # the compiled path must not lose the dynamic figure
            rows.append({"name": f"generate{label} FAILED", "error": f"{type(e).__name__}: {str(e)[:400]}"})
            continue
        if args.profile_dir and compiled and compile_encoder:
            profile_calls(run, Path(args.profile_dir) / "profile_generate.txt")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sections", default="matmul,encoder,step,loader,generate")
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--phases", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                   help="which phases the step section runs: 1,2 (default), 1 or 2")
    p.add_argument("--encoder_modes", default="none,default,reduce-overhead",
                   help="encoder ceilings: none (no compile) and torch.compile modes")
    p.add_argument("--step_variants", default="compiled,compiled_encoder,naive",
                   help="full-step variants, in order: compiled, compiled_ro_encoder, compiled_ro, forward, "
                        "forward_ro, forward_ma, compiled_encoder, sdpa, naive")
    p.add_argument("--profile_variants", default="",
                   help="step variants to profile with --profile_dir (default: the first)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--num_jpegs", type=int, default=12000)
    p.add_argument("--loader_batches", type=int, default=80, help="batches the loader-alone row takes")
    p.add_argument("--jpeg_dir", default="")
    p.add_argument("--loader_repeats", type=int, default=1,
                   help="the loader section's loader-fed row this many times, each paired with a synthetic row "
                        "after it; the median of the pairs' losses is reported")
    p.add_argument("--loader_variants", default="",
                   help="the loader section's step also fed by these loaders: worker counts, each optionally at a "
                        "niceness and on the JPEGs' copy shrunk to a short side (with a loader-alone row), e.g. "
                        "16,15:nice10,15@317")
    p.add_argument("--profile_dir", default="", help="write a profiler table of one step per phase here")
    p.add_argument("--tiny", action="store_true", help="tiny model for a CPU smoke test")
    p.add_argument("--out", default="throughput.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    timer = Timer(device)
    sections = set(args.sections.split(","))

    with tempfile.TemporaryDirectory() as dinov2_dir:
        if args.tiny:
            Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         patch_size=14, image_size=args.image_size).save_pretrained(dinov2_dir)
            tokenizer = random_word_tokenizer(400, 16)
        else:
            dinov2_dir = str(ROOT / "configs/models/dinov2-base")
            tokenizer = random_word_tokenizer(ModelConfig().text.vocab_size, ModelConfig().text.max_length)
        results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                         "torch": torch.__version__, "batch_size": args.batch_size, "image_size": args.image_size,
                         "rows": []}
        import transformers
        results["transformers"] = transformers.__version__
        matmul_tflops = float("nan")
        if "matmul" in sections:
            m = bench_matmul(timer, device, args)
            matmul_tflops = m["tflops"]
            results["matmul"] = m
            print(f"matmul {'bf16' if device.type == 'cuda' else 'fp32'}: {matmul_tflops:.1f} TFLOP/s", flush=True)
        cfg = model_config(args, dinov2_dir, "sdpa")
        for name, fn in (("encoder", lambda: bench_encoder(timer, device, args, cfg, tokenizer)),
                         ("step", lambda: bench_steps(timer, device, args, tokenizer, dinov2_dir, matmul_tflops)),
                         ("loader", lambda: bench_loader(timer, device, args, tokenizer, dinov2_dir)),
                         ("generate", lambda: bench_generate(timer, device, args, cfg, tokenizer))):
            if name not in sections:
                continue
            try:
                new_rows = fn()
            except Exception as e:  # one failing section must not lose the others' figures
                new_rows = [{"name": f"{name} FAILED", "error": f"{type(e).__name__}: {e}"}]
            for row in new_rows:
                print(json.dumps(row), flush=True)
            results["rows"].extend(new_rows)
            Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n{'measurement':<54}{'img/s':>10}{'ms/step':>10}{'peak GiB':>10}{'MFU':>8}")
    for r in results["rows"]:
        if "error" in r or "images_per_s" not in r:  # a failure, or a note such as the shrunk copy's
            print(f"{r['name']:<54} {r.get('error', '')[:200]}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        # steps: back to back, as trained; the loader alone: the mean per batch
        per_call = next(r[k] for k in ("pipelined_s", "median_s", "mean_s") if k in r)
        print(f"{r['name']:<54}{r['images_per_s']:>10.0f}{1e3 * per_call:>10.1f}{peak:>10}{mfu:>8}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
