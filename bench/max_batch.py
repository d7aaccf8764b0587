"""The largest phase-2 batch per GPU at the stage-1 recipe, with and without ``train.gradient_checkpointing``.

Each probe builds the trainer's model (``build_training_model``), switches LoRA on (``unfreeze_lora``: phase 2
keeps the most activations) and runs three ``train_step`` calls at one batch size; a CUDA out-of-memory error
means it does not fit. Batches double from ``--start`` until one fails, then a bisection down to ``--resolution``.
Eager (no compile): a compiled probe would recompile at every size. Peak memory of the largest fitting batch is
reported too.

    python bench/max_batch.py --out bench/results/max_batch.json
"""
from __future__ import annotations

import argparse
import gc

import torch

from common import (environment, peak_memory_gib, random_word_tokenizer, reset_peak_memory, stage1_model_config,
                    write_results)
from loravl.checkpoint import TrainState
from loravl.config import CompileConfig, TrainConfig
from loravl.device import choose_precision
from loravl.optim import build_optimizer
from loravl.runtime import DistributedEnv
from loravl.train import build_training_model, train_step, unfreeze_lora
from throughput import synthetic_batches


def fits(batch_size: int, checkpointing: bool, args, env: DistributedEnv) -> float | None:
    """Peak GiB of three phase-2 steps at ``batch_size``, or None where the GPU runs out of memory."""
    tc = TrainConfig(batch_size=batch_size, warmup_steps=5, compile=CompileConfig(enabled=False),
                     gradient_checkpointing=checkpointing)
    model_cfg = stage1_model_config(args.image_size)
    tokenizer = random_word_tokenizer(model_cfg.text.vocab_size, model_cfg.text.max_length)
    precision = choose_precision(tc.mixed_precision, env.device)
    model = optimizer = None
    try:
        model = build_training_model(model_cfg, tc, tokenizer, env, precision).train()
        optimizer = build_optimizer(model, tc, env.device)
        _, optimizer, _ = unfreeze_lora(model, optimizer, tc, env, 100, TrainState(step=1), announce=False)
        batches = synthetic_batches(tokenizer, batch_size, args.image_size, 1, pin=False)
        reset_peak_memory(env.device)
        for _ in range(3):
            train_step(model, batches, optimizer, precision, tc, env)
        torch.cuda.synchronize()
        return peak_memory_gib(env.device)
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(checkpointing: bool, args, env: DistributedEnv) -> dict:
    probes = {}
    size = args.start
    while size <= args.limit:
        probes[size] = fits(size, checkpointing, args, env)
        print(f"checkpointing {checkpointing}: batch {size}: {probes[size]}", flush=True)
        if probes[size] is None:
            break
        size *= 2
    good = max((b for b, peak in probes.items() if peak is not None), default=0)
    bad = min((b for b, peak in probes.items() if peak is None), default=None)
    while bad is not None and bad - good > args.resolution:
        middle = (good + bad) // 2 // args.resolution * args.resolution
        if middle <= good:
            break
        probes[middle] = fits(middle, checkpointing, args, env)
        print(f"checkpointing {checkpointing}: batch {middle}: {probes[middle]}", flush=True)
        good, bad = (middle, bad) if probes[middle] is not None else (good, middle)
    return {"row": f"phase 2, gradient_checkpointing {checkpointing}", "largest_batch": good,
            "peak_gib_at_largest": probes.get(good), "first_failing_batch": bad,
            "probes": {str(b): p for b, p in sorted(probes.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--start", type=int, default=128)
    parser.add_argument("--limit", type=int, default=8192, help="stop doubling here")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"))
    rows = []
    for checkpointing in (True, False):  # each written as it ends: a cut-off run keeps what it finished
        rows.append(largest_batch(checkpointing, args, env))
        print(rows[-1], flush=True)
        write_results(args.out, {**environment(env.device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
