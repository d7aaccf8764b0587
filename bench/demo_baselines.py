"""The demo's metrics next to the baselines they must beat.

    python bench/demo_baselines.py --checkpoint checkpoints/demo [--output bench/demo_baselines.json]

Rows, all on the demo val split:
  model        the trained model (ITC retrieval, ITM re-ranked retrieval, greedy captions)
  zero_image   the same model with every image zeroed (pixel_values = 0, the normalised mean colour): the caption
               model's text prior alone, and retrieval with no image information
  majority     the most frequent training caption, predicted for every image
  chance       uniform guessing: exact match 1 / (number of captions the generator can write, from its vocabulary
               constants), retrieval recall of a random ranking
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch


from loravl.data import COLOURS, RELATIONS, SHAPES
from loravl.data.formats import open_source
from loravl.data.loader import build_dataloader, build_dataset
from loravl.evaluate import caption_scores, chance_recall, evaluate_model
from loravl.device import resolve_device
from loravl.generate import quiet_library_output
from loravl.loading import load_model

REPORTED = ("exact_match", "bleu_4", "cider", "i2t_r1", "i2t_r5", "t2i_r1", "itm_i2t_r1", "itm_t2i_r1")


def possible_demo_captions() -> int:
    """Distinct captions the demo generator can produce: an unordered pair of distinct (colour, shape) objects
    (the first named is fixed by their order) times a relation."""
    objects = len(COLOURS) * len(SHAPES)
    return math.comb(objects, 2) * len(RELATIONS)


def zeroed_images(batches: Iterable[dict]) -> Iterator[dict]:
    for batch in batches:
        # float zeros: the encoder takes a float image as normalised already, so this is the mean colour (uint8
        # zeros would be black)
        yield {**batch, "pixel_values": torch.zeros(batch["pixel_values"].shape)}


def majority_caption(cfg: Any) -> str:
    table = open_source(cfg.data, "train")
    counts = Counter(c for i in range(len(table)) for c in table.record(i).captions)
    return counts.most_common(1)[0][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--k_test", type=int, default=16)
    args = parser.parse_args()
    quiet_library_output()

    model, cfg = load_model(args.checkpoint, resolve_device(args.device))
    dataset = build_dataset(cfg.data, "val", model.cfg.vision.image_size)
    rows: dict[str, dict[str, Any]] = {}

    started = time.perf_counter()
    rows["model"] = evaluate_model(model, dataset, cfg.data, batch_size=cfg.train.batch_size, k_test=args.k_test, log_samples=0)
    loader = build_dataloader(dataset, cfg.data, cfg.train.batch_size, train=False, seed=cfg.train.seed)
    rows["zero_image"] = evaluate_model(model, zeroed_images(loader), cfg.data, batch_size=cfg.train.batch_size, k_test=args.k_test, log_samples=0,
                                        return_captions=True)
    prior = Counter(s["caption"] for s in rows["zero_image"].pop("samples")).most_common(3)
    references = [list(dataset.table.record(i).captions) for i in range(len(dataset))]
    majority = majority_caption(cfg)
    rows["majority"] = caption_scores([majority] * len(references), references)
    num_images = rows["model"]["num_images"]
    captions_per_image = rows["model"]["num_texts"] / num_images
    chance = chance_recall(num_images, captions_per_image)
    rows["chance"] = {"exact_match": 1.0 / possible_demo_captions(), **chance,
                      **{f"itm_{k}": v for k, v in chance.items()}}

    print(f"demo val split: {num_images} images, {rows['model']['num_texts']} captions; "
          f"{possible_demo_captions()} possible captions; evaluated in {time.perf_counter() - started:.0f}s")
    print(f"zero-image captions (most common): {prior}")
    print(f"majority training caption: {majority!r}")
    print(f"{'':12}" + "".join(f"{key:>12}" for key in REPORTED))
    for name, metrics in rows.items():
        cells = []
        for key in REPORTED:
            value = metrics.get(key)
            if value is None:
                cells.append(f"{'-':>12}")
            elif key in ("bleu_4", "cider"):
                cells.append(f"{value:>12.3f}")
            else:
                cells.append(f"{100 * value:>11.1f}%")
        print(f"{name:12}" + "".join(cells))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
