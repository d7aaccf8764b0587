"""Does the trainer's step compute the same gradients with CUDA graphs (train.compile_mode: reduce-overhead)?

    python3 bench/cuda_graphs_check.py --out cuda_graphs_check.json     # on a GPU, about 3 minutes of compiling

``--scope forward``: the CUDA-graph variants compile the whole training forward (train.compile_scope: forward).
``--micro_batches 1``: one micro-batch per step, where the trainer keeps no gradient buffers (each gradient is the
backward graph's output until the optimizer has stepped; the widths alternate from step to step).

Runs ``loravl.train.train_step`` (two micro-batches of different caption lengths per step, bf16) for a few steps in
phase 1 and phase 2 on identically initialised models and records every gradient just before the optimizer step:
  default          torch.compile, no CUDA graphs: the reference
  reduce-overhead  the trainer with train.compile_mode reduce-overhead (gradients kept allocated)
  unsafe           the same graphs, gradients set to None between steps (the trainer before allocate_grads): the
                   first micro-batch's gradient is the graph's own output buffer, which the next replay overwrites
Dropout is off, so the runs differ only by how the step is executed. Prints each step's relative gradient error
against the reference and the LoRA gradient norm, and exits 1 if the trainer's variant is off by more than
``--tolerance`` or if LoRA gets no gradient in phase 2 (its path is switched off in phase 1, while B is zero).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from transformers import Dinov2Config  # noqa: E402

from loravl.config import ModelConfig, TextConfig, TrainConfig, VisionConfig  # noqa: E402
from loravl.model import VisionLanguageModel  # noqa: E402
from loravl.train import DistributedEnv, build_optimizer, choose_precision, train_step  # noqa: E402
from throughput import random_captions, random_word_tokenizer  # noqa: E402


def micro_batches(tokenizer, step: int, batch_size: int, image_size: int, count: int = 2) -> list[dict]:
    out = []
    for i, words in enumerate((6, 12)[:count]):  # two caption lengths: two padded widths, two sets of graphs
        g = torch.Generator().manual_seed(100 * step + i)
        captions = [" ".join(c.split()[:words]) for c in random_captions(batch_size, seed=100 * step + i)]
        out.append({"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                    "image_ids": torch.arange(batch_size) + (2 * step + i) * batch_size,
                    **tokenizer(captions), "skipped": Counter()})
    return out


def run_variant(name: str, args, cfg: ModelConfig, tokenizer, device) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Every gradient before each optimizer step, and the norm of the LoRA gradients at each step (0 in phase 1;
    in phase 2 it must not be: the encoder's LoRA path, off in phase 1, must be back on in the compiled graphs)."""
    mode = "default" if name == "default" else "reduce-overhead"
    scope = "modules" if name == "default" else args.scope  # the reference is always the per-submodule compile
    # unsafe: graphs compiled in, but the step is told nothing of them (compile: false), as before allocate_grads
    tc = TrainConfig(compile=name != "unsafe", compile_mode=mode, compile_scope=scope, lr=1e-4, lora_lr=1e-4,
                     max_grad_norm=1.0)
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=device)
    precision = choose_precision("auto", device)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, tokenizer).to(device).train()
    model.compile(scope=scope, mode=mode)
    grads: list[list[torch.Tensor]] = []
    lora_norms: list[float] = []
    lora = [p for _, p in model.lora_parameters()]
    step = 0

    def record(*_):
        grads.append([torch.zeros_like(p, dtype=torch.float) if p.grad is None else p.grad.detach().float().clone()
                      for p in params])
        lora_norms.append(float(sum(p.grad.float().pow(2).sum() for p in lora if p.grad is not None) ** 0.5))

    for phase in (1, 2):
        model.set_lora_trainable(phase == 2)
        optimizer = build_optimizer(model, tc, device)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.register_step_pre_hook(record)
        for _ in range(args.steps):
            torch.manual_seed(1000 + step)  # the same hard negatives in every variant
            # one micro-batch: alternately short and long captions, so that both widths' graphs replay
            count = args.micro_batches
            batches = micro_batches(tokenizer, step, args.batch_size, cfg.vision.image_size, count=2)
            train_step(model, batches if count == 2 else batches[step % 2:][:1], optimizer, precision, tc, env)
            step += 1
    return grads, lora_norms


def relative_error(grads, reference) -> float:
    num = sum((g - r).pow(2).sum() for g, r in zip(grads, reference))
    den = sum(r.pow(2).sum() for r in reference)
    return float((num / den).sqrt()) if len(grads) == len(reference) else float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per phase")
    p.add_argument("--batch_size", type=int, default=32, help="per micro-batch")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--micro_batches", type=int, default=2, choices=[1, 2],
                   help="per step; with 1 the trainer leaves gradients in the graphs' memory (no buffers), and the "
                        "unsafe variant is the same thing, so it is not run")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test of the script)")
    p.add_argument("--scope", default="modules", choices=["modules", "forward"],
                   help="train.compile_scope of the CUDA-graph variants (the reference compiles per submodule)")
    p.add_argument("--out", default="cuda_graphs_check.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as dinov2_dir:
        # A small DINOv2 (4 layers) keeps compilation short; the graph handling does not depend on the size.
        width, layers = (32, 1) if args.tiny else (384, 4)
        Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64 or 2,
                     intermediate_size=4 * width, patch_size=14, image_size=224).save_pretrained(dinov2_dir)
        cfg = ModelConfig()
        cfg.vision = VisionConfig(pretrained=dinov2_dir, random_init=True, image_size=112 if args.tiny else 224)
        cfg.vision.lora.dropout = cfg.compressor.dropout = cfg.fusion.dropout = 0.0
        cfg.text = TextConfig(num_layers=1 if args.tiny else 2, dropout=0.0,
                              **(dict(vocab_size=400, max_length=24, hidden_size=64, num_heads=2) if args.tiny
                                 else {}))
        cfg.loss.queue_size = 256
        tokenizer = random_word_tokenizer(cfg.text.vocab_size, cfg.text.max_length)
        results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "steps_per_phase": args.steps, "batch_size": args.batch_size,
                   "micro_batches": args.micro_batches,
                   "scope": args.scope,
                   "variants": {}}
        reference, reference_lora = run_variant("default", args, cfg, tokenizer, device)
        results["variants"]["default"] = {"lora_grad_norm_per_step": reference_lora}
        print("default", json.dumps(results["variants"]["default"]), flush=True)
        phase2 = slice(args.steps, None)
        failed = not all(n > 0 for n in reference_lora[phase2])
        for name in ("reduce-overhead", "unsafe")[: 2 if args.micro_batches == 2 else 1]:
            try:
                grads, lora_norms = run_variant(name, args, cfg, tokenizer, device)
                errors = [relative_error(g, r) for g, r in zip(grads, reference)]
                results["variants"][name] = {"relative_grad_error_per_step": errors, "max": max(errors),
                                             "lora_grad_norm_per_step": lora_norms}
            except Exception as e:  # the unsafe variant may also fail loudly
                results["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                errors = lora_norms = None
            print(name, json.dumps(results["variants"][name]), flush=True)
            if name == "reduce-overhead":
                failed = failed or errors is None or max(errors) > args.tolerance \
                    or not all(n > 0 for n in lora_norms[phase2])
        results["passed"] = not failed
        Path(args.out).write_text(json.dumps(results, indent=2))
    print("PASSED" if not failed else "FAILED", f"(tolerance {args.tolerance})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
