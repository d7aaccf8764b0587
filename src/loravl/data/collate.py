"""Samples -> the batch dict the model and trainer read. Skip markers are dropped here and counted."""
from __future__ import annotations

import math
import multiprocessing
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from loravl.data.skips import Skip

Tokenize = Callable[[list[str]], Mapping[str, Any]]


class SharedBatchSlots:
    """Shared-memory batches the loader's workers reuse.

    A fresh shared-memory batch costs more than its copy: the worker's writes and the main process's reads each
    fault in every page. Each worker keeps a few slots
    instead. A slot is taken (flag 1) when a batch's pixels are written into it and released (flag 0) by
    ``CaptionLoader`` once they are copied out: into pinned memory by the pin thread (CUDA), or by
    ``CaptionLoader`` itself. The main process keeps its mapping of each slot (``SlotHandle``), so the next batch
    in it maps nothing new. Nothing waits for a slot: a worker without a free one writes a fresh batch.
    """

    def __init__(self, num_workers: int, slots_per_worker: int) -> None:
        self.slots_per_worker = slots_per_worker
        # The lock orders a release after the pin thread's copy and before the worker's next write.
        self.flags = multiprocessing.Array("b", num_workers * slots_per_worker)
        self._storages: dict[int, torch.UntypedStorage] = {}  # in a worker: its slots, made as first needed

    def take(self, nbytes: int) -> Optional[tuple[int, torch.UntypedStorage]]:
        """In a worker: a free slot of at least ``nbytes``, marked taken, or None."""
        first = get_worker_info().id * self.slots_per_worker
        with self.flags.get_lock():
            for index in range(first, first + self.slots_per_worker):
                storage = self._storages.get(index)
                if not self.flags[index] and (storage is None or storage.nbytes() >= nbytes):
                    self.flags[index] = 1
                    break
            else:
                return None
        if storage is None:
            storage = self._storages[index] = torch.UntypedStorage._new_shared(nbytes)
        return index, storage

    def release(self, index: int) -> None:
        with self.flags.get_lock():
            self.flags[index] = 0

    def release_all(self) -> None:
        """A new pass over the loader: batches left in flight by the last one were dropped unread."""
        with self.flags.get_lock():
            self.flags[:] = bytes(len(self.flags))


class SlotHandle:
    """A batch's slot, carried beside its pixels. Not a tensor or container, so the pin thread passes it as it is;
    its ``pixels`` keep the main process's mapping of the slot alive between batches."""

    def __init__(self, index: int, pixels: torch.Tensor) -> None:
        self.index, self.pixels = index, pixels


def stack_images(images: Sequence[torch.Tensor], slots: Optional[SharedBatchSlots] = None
                 ) -> tuple[torch.Tensor, Optional[SlotHandle]]:
    """uint8 images [3, H, W] -> a batch [B, 3, H, W] in their memory layout, [B, H, W, 3] for the transforms'
    channels-last images: one plain copy each (a transposing copy to channels-first cost more than the resize).

    In a loader worker the batch is written straight into shared memory, as torch's default collate does, so
    handing it to the main process copies nothing more: into a reused slot when ``slots`` has a free one."""
    hwc = [image.permute(1, 2, 0) for image in images]
    last = all(view.is_contiguous() for view in hwc)
    arrays = [view.numpy() for view in (hwc if last else images)]
    shape = (len(arrays), *arrays[0].shape)
    nbytes = math.prod(shape)
    handle = None
    if get_worker_info() is not None:
        taken = slots.take(nbytes) if slots is not None else None
        index, storage = taken if taken is not None else (None, torch.UntypedStorage._new_shared(nbytes))
        batch = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
        if index is not None:
            handle = SlotHandle(index, batch)
    else:
        batch = torch.empty(shape, dtype=torch.uint8)
    # numpy's single-threaded copy: torch.stack's intra-op threads were 10x slower in a busy main process.
    np.stack(arrays, out=batch.numpy())
    return (batch.permute(0, 3, 1, 2) if last else batch), handle


class CaptionCollator:
    """Builds ``{"pixel_values" [B,3,H,W] uint8, "captions", "image_ids" [B], "skipped": Counter}`` plus, for eval,
    ``all_captions`` and, with ``tokenize``, what it returns (``input_ids``, ``attention_mask``).

    Runs in the worker processes, so tokenization is parallel too. A batch whose samples were all skipped has B=0
    (the loader wrapper does not yield those; it only counts them).
    """

    def __init__(self, image_size: int, *, tokenize: Optional[Tokenize] = None, keep_all_captions: bool = False,
                 slots: Optional[SharedBatchSlots] = None):
        self.image_size = image_size
        self.tokenize = tokenize
        self.keep_all_captions = keep_all_captions
        self.slots = slots

    def __call__(self, samples: Sequence[Union[dict[str, Any], Skip]]) -> dict[str, Any]:
        kept = [s for s in samples if not isinstance(s, Skip)]
        skipped = Counter(s.reason for s in samples if isinstance(s, Skip))
        slot = None
        if kept:
            pixel_values, slot = stack_images([s["pixel_values"] for s in kept], self.slots)
        else:
            pixel_values = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        batch: dict[str, Any] = {
            "pixel_values": pixel_values,
            "captions": [s["caption"] for s in kept],
            "image_ids": torch.tensor([s["image_id"] for s in kept], dtype=torch.long),
            "skipped": skipped,
            # Each skipped sample's reason, file and description: the epoch counts each file once (a file with
            # several captions is several samples) and names the first few. A batch rarely has many.
            "skipped_samples": [(s.reason, s.source, s.describe()) for s in samples if isinstance(s, Skip)],
        }
        if self.keep_all_captions:
            batch["all_captions"] = [s["captions"] for s in kept]
        if self.tokenize is not None and kept:
            batch.update(dict(self.tokenize(batch["captions"])))
        if slot is not None:
            batch["pixel_slot"] = slot  # CaptionLoader releases it and takes it out
        return batch
