"""Throughput of the trainer's own stage-1 step on one GPU: ``loravl.train.train_step`` with the trainer's model
(``build_training_model``), optimizer, schedule and phase switch (``unfreeze_lora``), on synthetic batches shaped as
the loader gives them (uint8 pixels, COCO-length captions). Nothing here is a second trainer.

    python bench/throughput.py --out bench/results/throughput.json          # the stage-1 recipe, batch 128
    python bench/throughput.py --tiny --steps 2 --warmup 1 --out /tmp/t.json  # CPU smoke test of the script

Rows: the bf16 matmul rate (MFU's ceiling), phase 1 (LoRA frozen) and phase 2 (LoRA training) in img/s, ms per
step and peak GiB, and greedy captioning (``--generate_batch`` images, 30 new tokens). The steps run back to back as
the trainer runs them (the host ahead of the GPU), timed from the first step after ``--warmup`` (compilation) to
the GPU's end of the last.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (environment, peak_memory_gib, random_captions, random_word_tokenizer, reset_peak_memory,
                    stage1_model_config, synchronize, write_results)
from loravl.checkpoint import TrainState
from loravl.config import CompileConfig, TrainConfig
from loravl.device import bf16_autocast, choose_precision
from loravl.generate import generate_captions
from loravl.optim import build_optimizer, build_scheduler
from loravl.runtime import DistributedEnv
from loravl.train import build_training_model, train_step, unfreeze_lora


def synthetic_batches(tokenizer, batch_size: int, image_size: int, count: int, pin: bool) -> list[dict]:
    """``count`` distinct batches as the loader yields them: uint8 RGB, channels-last in memory (the encoder
    normalises on the device), padded captions, unique image ids, and the skip counts."""
    batches = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=g)
        batch = {"pixel_values": pixels.permute(0, 3, 1, 2), "image_ids": torch.arange(batch_size) + i * batch_size,
                 **tokenizer(random_captions(batch_size, i))}
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batches.append({**batch, "skipped": Counter()})
    return batches


# The frozen encoder's fc1 + GELU runs as one cuBLASLt call (loravl.vision.GeluMLP), which the FLOP counter does
# not know: count it as the matrix product it is.
if torch.ops.aten._addmm_activation not in torch.utils.flop_counter.flop_registry:
    torch.utils.flop_counter.register_flop_formula(torch.ops.aten._addmm_activation, get_raw=True)(
        torch.utils.flop_counter.addmm_flop)


def step_flops(model, batch, optimizer, precision, tc, env) -> int:
    """FLOPs of one eager step (the compiled graphs do the same arithmetic)."""
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        train_step(model, [batch], optimizer, precision, tc, env)
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, tiny: bool) -> float:
    n = 1024 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def time_phase(phase: int, model, batches, optimizer, scheduler, precision, tc, env, args, peak_tflops) -> dict:
    """The trainer's loop body without its loader and logs: train_step, then the schedule."""
    flops = step_flops(model, batches[0], optimizer, precision, tc, env) if args.flops else None
    reset_peak_memory(env.device)  # before the warm-up: CUDA graphs allocate their pools while they are recorded
    for i in range(args.warmup):
        train_step(model, [batches[i % len(batches)]], optimizer, precision, tc, env)
        scheduler.step()
    synchronize(env.device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        metrics = train_step(model, [batches[i % len(batches)]], optimizer, precision, tc, env)
        scheduler.step()
    synchronize(env.device)
    seconds = (time.perf_counter() - t0) / args.steps
    row = {"row": f"step phase {phase}", "images_per_s": args.batch_size / seconds, "ms_per_step": 1e3 * seconds,
           "peak_gib": peak_memory_gib(env.device), "loss": float(metrics["loss"]),
           "trainable_params": sum(p.numel() for _, p in model.trainable_parameters())}
    if flops is not None:
        row["step_tflop"] = flops / 1e12
        row["mfu"] = flops / seconds / 1e12 / peak_tflops if peak_tflops else None
    return row


def time_generation(model, tokenizer, args, device: torch.device) -> dict:
    """Greedy decoding as loravl-caption runs it on a GPU: compiled static-cache decoding (generate(compile=True)),
    the training forward's compiled graph left aside."""
    pixels = synthetic_batches(tokenizer, args.generate_batch, args.image_size, 1, pin=False)[0]["pixel_values"]
    model.eval()
    compiled = device.type == "cuda" and args.compile_mode != "off"
    with bf16_autocast(device):
        for _ in range(2):  # warm-up: compilation
            generate_captions(model, pixels, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              compile=compiled)
        synchronize(device)
        t0 = time.perf_counter()
        generate_captions(model, pixels, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          compile=compiled)
        synchronize(device)
    seconds = time.perf_counter() - t0
    model.train()
    return {"row": f"generate greedy, batch {args.generate_batch}, {args.new_tokens} new tokens"
                   + (", compiled" if compiled else ""),
            "images_per_s": args.generate_batch / seconds, "ms_per_batch": 1e3 * seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=15, help="steps per phase before timing (compilation)")
    parser.add_argument("--compile_mode", default="reduce-overhead", help="train.compile.mode; 'off': eager")
    parser.add_argument("--compile_scope", default="forward")
    parser.add_argument("--generate_batch", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=30)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--momentum_encoder", action="store_true", help="model.loss.momentum_encoder")
    parser.add_argument("--memory", action="store_true", help="model.memory.enabled (the stage-1 sizes)")
    parser.add_argument("--no_flops", dest="flops", action="store_false", help="skip the FLOP count (and MFU)")
    parser.add_argument("--no_generate", dest="generate", action="store_false")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a CPU smoke test of the script")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=device)
    compile_cfg = CompileConfig(enabled=args.compile_mode != "off" and device.type == "cuda",
                                mode=args.compile_mode if args.compile_mode != "off" else "default",
                                scope=args.compile_scope)
    # The recipe's optimizer settings; the warmup is short so that the timed steps run at full learning rate.
    tc = TrainConfig(batch_size=args.batch_size, warmup_steps=5, compile=compile_cfg,
                     gradient_checkpointing=args.gradient_checkpointing)
    model_cfg = stage1_model_config(args.image_size, tiny=args.tiny)
    model_cfg.loss.momentum_encoder = args.momentum_encoder
    model_cfg.memory.enabled = args.memory
    tokenizer = random_word_tokenizer(model_cfg.text.vocab_size, model_cfg.text.max_length)
    precision = choose_precision(tc.mixed_precision, device)
    batches = synthetic_batches(tokenizer, args.batch_size, args.image_size, 4, pin=device.type == "cuda")
    total_steps = 2 * (args.warmup + args.steps + 1)

    rows = []
    peak_tflops = matmul_tflops(device, args.tiny)
    rows.append({"row": "matmul bf16 8192^3" if device.type == "cuda" else "matmul fp32", "tflops": peak_tflops})
    model = build_training_model(model_cfg, tc, tokenizer, env, precision).train()
    optimizer = build_optimizer(model, tc, device)
    scheduler = build_scheduler(optimizer, tc, total_steps, steps_done=0)
    rows.append(time_phase(1, model, batches, optimizer, scheduler, precision, tc, env, args, peak_tflops))
    state = TrainState(step=args.warmup + args.steps + int(args.flops))
    _, optimizer, scheduler = unfreeze_lora(model, optimizer, tc, env, total_steps, state)
    rows.append(time_phase(2, model, batches, optimizer, scheduler, precision, tc, env, args, peak_tflops))
    if args.generate:
        rows.append(time_generation(model, tokenizer, args, device))
    for row in rows:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    result = {**environment(device), "args": vars(args), "rows": rows}
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
