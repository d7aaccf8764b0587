"""Samples -> the batch dict the model and trainer read. Skip markers are dropped here and counted."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from loravl.data.skips import Skip

Tokenize = Callable[[list[str]], Mapping[str, Any]]


class CaptionCollator:
    """Builds ``{"pixel_values" [B,3,H,W] uint8, "captions", "image_ids" [B], "skipped": Counter}`` plus, for eval,
    ``all_captions`` and, with ``tokenize``, what it returns (``input_ids``, ``attention_mask``).

    Runs in the worker processes, so tokenization is parallel too. A batch whose samples were all skipped has B=0
    (the loader wrapper does not yield those; it only counts them).
    """

    def __init__(self, image_size: int, *, tokenize: Optional[Tokenize] = None, keep_all_captions: bool = False):
        self.image_size = image_size
        self.tokenize = tokenize
        self.keep_all_captions = keep_all_captions

    def __call__(self, samples: Sequence[Union[dict[str, Any], Skip]]) -> dict[str, Any]:
        kept = [s for s in samples if not isinstance(s, Skip)]
        skipped = Counter(s.reason for s in samples if isinstance(s, Skip))
        if kept:
            # numpy's single-threaded copy: torch.stack's intra-op threads were 10x slower in a busy main process.
            pixel_values = torch.from_numpy(np.stack([s["pixel_values"].numpy() for s in kept]))
        else:
            pixel_values = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        batch: dict[str, Any] = {
            "pixel_values": pixel_values,
            "captions": [s["caption"] for s in kept],
            "image_ids": torch.tensor([s["image_id"] for s in kept], dtype=torch.long),
            "skipped": skipped,
        }
        if self.keep_all_captions:
            batch["all_captions"] = [s["captions"] for s in kept]
        if self.tokenize is not None and kept:
            batch.update(dict(self.tokenize(batch["captions"])))
        return batch
