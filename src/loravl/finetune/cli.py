"""Command line of src/finetune_classifier.py (and the shared options of bench/adapters.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .adapters import ADAPTERS, DEFAULT_LR, LORA_PRESETS
from .loop import FinetuneConfig, run_finetune


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything but the adapter choice."""
    parser.add_argument("--data", required=True,
                        help="an image folder (class subfolders, optionally under train/ val/ test/), a folder "
                             "written by datasets' save_to_disk, 'flowers102' (torchvision download) or "
                             "'flowers102:DIR' (already downloaded there, torchvision's layout)")
    parser.add_argument("--backbone", default="facebook/dinov2-base",
                        help="a DINOv2 folder or hub name, a stage-1 checkpoint (folder or checkpoint dir), "
                             "a timm FastViT name such as fastvit_t8, or a CLIP ViT: clip_vit_b32, clip_vit_b16, "
                             "clip:<open_clip model name or config .json>")
    parser.add_argument("--random-init", action="store_true", help="the backbone's architecture with random weights")
    parser.add_argument("--weights", default=None,
                        help="a CLIP backbone's weights file (default: open_clip's 'openai' weights, downloaded)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None,
                        help="adapter learning rate (default per adapter: "
                             + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--preset", choices=sorted(LORA_PRESETS), default="medium",
                        help="LoRA rank/alpha: simple 8/16, medium 16/32, complex 32/64")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (overrides the preset)")
    parser.add_argument("--alpha", type=int, default=None, help="LoRA alpha (overrides the preset)")
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated layer names (default query,key,value,dense,fc1,fc2; either "
                             "transformers naming works; CLIP: in_proj,out_proj,c_fc,c_proj). Ignored for FastViT: "
                             "all dense stage convs")
    parser.add_argument("--num-prompts", type=int, default=10,
                        help="prompt tokens (--adapter prompt), or prefix length per layer (--adapter prefix)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--download-root", default="data/flowers102", help="where flowers102 is downloaded")


def config_from_args(args: argparse.Namespace, adapter: str) -> FinetuneConfig:
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    return FinetuneConfig(
        data=args.data, adapter=adapter, backbone=args.backbone, random_init=args.random_init, weights=args.weights,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        head_lr=args.head_lr, weight_decay=args.weight_decay, preset=args.preset, rank=args.rank, alpha=args.alpha,
        lora_dropout=args.lora_dropout, lora_targets=targets, num_prompts=args.num_prompts,
        num_workers=args.num_workers, seed=args.seed, device=args.device, download_root=args.download_root)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune an image classifier: a vision backbone + one adapter.")
    parser.add_argument("--adapter", choices=ADAPTERS, default="lora")
    add_common_arguments(parser)
    parser.add_argument("--out", default=None, help="write the result (history, test accuracy) as JSON here")
    args = parser.parse_args(argv)
    result = run_finetune(config_from_args(args, args.adapter))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    return 0
