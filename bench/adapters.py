"""Adapter comparison on one classification dataset: trainable parameters, accuracy and training time per method.

    python bench/adapters.py --data /data/my_imagefolder --backbone facebook/dinov2-base --epochs 10 --out adapters.json
    python bench/adapters.py --data flowers102 --methods lora,lora_fa,bitfit,linear
    python bench/adapters.py --make-synthetic /tmp/synthetic --data /tmp/synthetic --backbone <tiny dinov2 folder> \
        --image-size 28 --epochs 5 --head-lr 1e-2        # the smoke test tests/test_finetune.py runs

Every method runs with the same data, seed, epochs and head learning rate; the adapter learning rate is each
method's default unless --lr is given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


from loravl.finetune import ADAPTERS, load_classification_data, run_finetune, write_synthetic_imagefolder
from loravl.finetune.cli import add_common_arguments, config_from_args


def format_table(rows: list[dict]) -> str:
    header = f"{'method':<8} {'trainable':>11} {'% of total':>10} {'best val':>8} {'test acc':>8} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['adapter']:<8} {r['trainable_params']:>11,} "
                     f"{100.0 * r['trainable_params'] / r['total_params']:>9.3f}% {r['best_val_accuracy']:>8.3f} "
                     f"{r['test_accuracy']:>8.3f} {r['train_seconds']:>8.1f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(ADAPTERS), help="comma-separated subset of " + ",".join(ADAPTERS))
    parser.add_argument("--make-synthetic", default=None, metavar="DIR",
                        help="first write the synthetic colour-shape image folder to DIR")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ADAPTERS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(ADAPTERS)}")
    if args.make_synthetic:
        write_synthetic_imagefolder(args.make_synthetic, image_size=max(args.image_size, 28), seed=args.seed)

    data = load_classification_data(args.data, args.image_size, args.seed, download_root=args.download_root)
    rows = []
    for method in methods:
        print(f"== {method}")
        result = run_finetune(config_from_args(args, method), data=data)
        rows.append(result.to_dict())
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
