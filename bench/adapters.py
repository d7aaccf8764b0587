"""Adapter comparison on one classification dataset: trainable parameters, accuracy and training time per method.

    python bench/adapters.py --data /data/my_imagefolder --backbone facebook/dinov2-base --epochs 10 --out adapters.json
    python bench/adapters.py --data flowers102 --methods lora,lora_fa,bitfit,linear
    python bench/adapters.py --make-synthetic /tmp/synthetic --data /tmp/synthetic --backbone <tiny dinov2 folder> \
        --image-size 28 --epochs 5 --head-lr 1e-2        # the smoke test tests/test_finetune.py runs

Every method runs with the same data, seed, epochs and head learning rate; the adapter learning rate is each
method's default unless --lr is given. A method is an adapter name or one of VARIANTS (LoRA on the attention
projections alone or with the MLP's, at a rank); step time and, on a GPU, peak memory are measured per method.

    python bench/adapters.py --make-synthetic /tmp/s --data /tmp/s --backbone clip_vit_b16 --random-init \
        --methods lora_attn_r8,lora_attn_r16,lora_r8,lora_r16,lora_fa,bitfit,prefix,prompt,linear,full
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


import dataclasses

from loravl.finetune import ADAPTERS, load_classification_data, run_finetune, write_synthetic_imagefolder
from loravl.finetune.cli import add_common_arguments, config_from_args
from loravl.finetune.clip import CLIP_MEAN, CLIP_STD, is_clip_backbone
from loravl.finetune.data import IMAGENET_MEAN, IMAGENET_STD

# name: (rank, LoRA on the attention projections only); alpha = 2 * rank as the presets have it
VARIANTS = {"lora_attn_r8": (8, True), "lora_attn_r16": (16, True), "lora_r8": (8, False), "lora_r16": (16, False)}
ATTENTION_TARGETS = {"clip": ["in_proj", "out_proj"], "dinov2": ["query", "key", "value", "dense"]}


def method_config(args: argparse.Namespace, method: str):
    if method not in VARIANTS:
        return config_from_args(args, method)
    rank, attention_only = VARIANTS[method]
    targets = ATTENTION_TARGETS["clip" if is_clip_backbone(args.backbone) else "dinov2"] if attention_only else None
    return dataclasses.replace(config_from_args(args, "lora"), rank=rank, alpha=2 * rank, lora_targets=targets)


def format_table(rows: list[dict]) -> str:
    header = (f"{'method':<14} {'trainable':>11} {'% of total':>10} {'best val':>8} {'test acc':>8} {'train s':>8} "
              f"{'step ms':>8} {'peak GiB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        step = f"{r['step_ms']:8.1f}" if r.get("step_ms") is not None else f"{'-':>8}"
        peak = f"{r['peak_memory_gib']:8.2f}" if r.get("peak_memory_gib") is not None else f"{'-':>8}"
        lines.append(f"{r['method']:<14} {r['trainable_params']:>11,} "
                     f"{100.0 * r['trainable_params'] / r['total_params']:>9.3f}% {r['best_val_accuracy']:>8.3f} "
                     f"{r['test_accuracy']:>8.3f} {r['train_seconds']:>8.1f} {step} {peak}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(ADAPTERS),
                        help="comma-separated, of " + ",".join([*ADAPTERS, *VARIANTS]))
    parser.add_argument("--make-synthetic", default=None, metavar="DIR",
                        help="first write the synthetic colour-shape image folder to DIR")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ADAPTERS and m not in VARIANTS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join([*ADAPTERS, *VARIANTS])}")
    if args.make_synthetic:
        write_synthetic_imagefolder(args.make_synthetic, image_size=max(args.image_size, 28), seed=args.seed)

    normalization = (CLIP_MEAN, CLIP_STD) if is_clip_backbone(args.backbone) else (IMAGENET_MEAN, IMAGENET_STD)
    data = load_classification_data(args.data, args.image_size, args.seed, download_root=args.download_root,
                                    normalization=normalization)
    rows = []
    for method in methods:
        print(f"== {method}")
        result = run_finetune(method_config(args, method), data=data)
        rows.append({"method": method, **result.to_dict()})
        if args.out:  # after each method: a run cut short keeps what it finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
