"""LoRA vs LoRA-FA at equal rank on the DINOv2-base architecture (random weights): step time and memory.

    python bench/lora_variants.py --out bench_lora_variants.json                  # on a GPU: the real measurement
    python bench/lora_variants.py --tiny --out /tmp/lora_variants.json            # CPU smoke test, tiny config

Both variants run the same VisionEncoder (frozen DINOv2 + PEFT LoRA on ``--targets``) through the same steps:
forward, a stand-in loss on every output token, backward, AdamW step on the LoRA parameters the variant trains.
Reported per variant:
  step_ms            median wall time of a full training step (CUDA-synchronised on a GPU)
  saved_activations  bytes autograd keeps for backward, counted by saved_tensors_hooks (unique storages);
                     device independent, so --tiny measures it too
  forward_delta      on CUDA: memory allocated after the forward minus before (activations + outputs)
  grad_bytes         bytes of .grad buffers after backward
  optimizer_state    bytes of AdamW's moment buffers
  peak               on CUDA: max_memory_allocated during the step (everything: weights, activations, grads, states)
Where LoRA-FA saves: A is frozen, so autograd need not keep the full-width input of every lora_A (the dropout output
that feeds it) for A's weight gradient, only the r-wide A x for B's; and A has neither a gradient nor Adam moments.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch


from transformers import Dinov2Config

from loravl.config import LoraConfig, VisionConfig
from loravl.lora_fa import build_lora_optimizer_param_groups
from loravl.vision import VisionEncoder

DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=14, image_size=518)
DINOV2_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   patch_size=14, image_size=56)


@contextmanager
def count_saved_tensors(counter: dict) -> Iterator[None]:
    """Sum the bytes of the distinct storages autograd saves for backward while the block runs."""
    seen: set = set()

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                counter["bytes"] = counter.get("bytes", 0) + storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. nested, meta)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_variant(variant: str, config_dir: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    lora = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                      target_modules=[t.strip() for t in args.targets.split(",")], variant=variant)
    encoder = VisionEncoder(VisionConfig(pretrained=config_dir, random_init=True, image_size=args.image_size,
                                         attn_implementation=args.attn, lora=lora)).to(device)
    encoder.set_lora_trainable(True)
    encoder.train()
    groups = build_lora_optimizer_param_groups(encoder.lora_parameters(), lr=1e-4, weight_decay=0.0,
                                               variant=variant)
    optimizer = torch.optim.AdamW(groups)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    use_bf16 = device.type == "cuda" and args.precision == "bf16"
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    def step(record: Optional[dict] = None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if record is None:
                loss = encoder(pixels).float().pow(2).mean()
            else:
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                with count_saved_tensors(record):
                    loss = encoder(pixels).float().pow(2).mean()
                if device.type == "cuda":
                    record["forward_delta"] = torch.cuda.memory_allocated(device) - before
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if record is not None:
            record["grad_bytes"] = tensor_bytes(p.grad for p in encoder.parameters())
        optimizer.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record: dict = {}
    step(record)
    _sync(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    state_bytes = tensor_bytes(v for s in optimizer.state.values() for v in s.values()
                               if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {
        "variant": variant,
        "trainable_params": trainable,
        "lora_params_total": sum(p.numel() for _, p in encoder.lora_parameters()),
        "step_ms": 1000 * statistics.median(times),
        "step_ms_mean": 1000 * statistics.fmean(times),
        "saved_activations": record.get("bytes", 0),
        "forward_delta": record.get("forward_delta"),
        "grad_bytes": record["grad_bytes"],
        "optimizer_state": state_bytes,
        "param_bytes": tensor_bytes(encoder.parameters()),
        "peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def format_table(rows: list[dict]) -> str:
    header = (f"{'variant':<8} {'trainable':>10} {'step ms':>8} {'saved act MiB':>13} {'fwd delta MiB':>13} "
              f"{'grads MiB':>9} {'opt state MiB':>13} {'peak MiB':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['variant']:<8} {r['trainable_params']:>10,} {r['step_ms']:>8.1f} "
                     f"{_mib(r['saved_activations']):>13} {_mib(r['forward_delta']):>13} {_mib(r['grad_bytes']):>9} "
                     f"{_mib(r['optimizer_state']):>13} {_mib(r['peak']):>9}")
    if len(rows) == 2 and rows[0]["saved_activations"]:
        a, b = rows
        lines.append(f"lora_fa / lora: saved activations {b['saved_activations'] / a['saved_activations']:.3f}, "
                     f"optimizer state {b['optimizer_state'] / max(a['optimizer_state'], 1):.3f}, "
                     f"step time {b['step_ms'] / a['step_ms']:.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny DINOv2 config and batch: a CPU smoke test")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (4 with --tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (56 with --tiny)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--targets", default="query,value", help="LoRA target layers (either naming)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --tiny)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on CUDA")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.tiny else 64)
    args.image_size = args.image_size or (56 if args.tiny else 224)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    with tempfile.TemporaryDirectory() as config_dir:
        Dinov2Config(**(DINOV2_TINY if args.tiny else DINOV2_BASE)).save_pretrained(config_dir)
        rows = []
        for variant in ("lora", "lora_fa"):
            rows.append(measure_variant(variant, config_dir, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"batch {args.batch_size}, image {args.image_size}, rank {args.rank}, alpha {args.alpha}, "
          f"targets {args.targets}, dropout {args.dropout}, precision {args.precision if device.type == 'cuda' else 'fp32'}")
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": str(device), "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
