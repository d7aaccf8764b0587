"""``build_dataset`` and ``build_dataloader``: distributed, resumable, multi-worker loading of any format.

Map-style data goes through torchdata's ``StatefulDataLoader`` with a stateful distributed sampler; streaming data
(webdataset, HF streaming) through the same loader with a dataset that saves its own per-worker position. Either
way ``CaptionLoader.state_dict()`` is this rank's state: save one per rank, load it into the same rank with the same
world size and num_workers.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Union

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from loravl.config import DataConfig
from loravl.data.collate import CaptionCollator, SharedBatchSlots, Tokenize
from loravl.data.datasets import CaptionDataset, SampleBuilder, StreamingCaptionDataset
from loravl.data.formats import is_streaming, open_source
from loravl.data.images import build_transform, decode_target_size
from loravl.data.skips import SkipCounter

AnyCaptionDataset = Union[CaptionDataset, StreamingCaptionDataset]

# Mid-epoch the skip fraction is only judged after this many samples, so a few bad files early do not stop a run.
MIN_SAMPLES_BEFORE_SKIP_CHECK = 512


class EpochDistributedSampler(StatefulDistributedSampler):
    """This rank's indices for the epoch, shuffled by (seed, epoch), each tagged with the epoch.

    The tag is how persistent worker processes learn the epoch (their copy of the dataset never sees set_epoch).
    State (how many indices were yielded) comes from torchdata's StatefulDistributedSampler.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for index in super().__iter__():
            yield index, epoch


def build_dataset(cfg: DataConfig, split: str, image_size: int, *, train: Optional[bool] = None) -> AnyCaptionDataset:
    """The dataset of ``split`` ("train" or "val") in ``cfg.format``; fails now on a wrong path or column.

    ``train`` (default: split == "train") picks the random-crop transform and one random caption per image per
    epoch; otherwise resize + centre crop and the first caption (all of them in ``all_captions``).
    """
    train = split == "train" if train is None else train
    source = open_source(cfg, split)
    builder = SampleBuilder(
        transform=build_transform(image_size, train, crop_scale=(cfg.crop_scale_min, 1.0), hflip=cfg.hflip),
        image_size=image_size, train=train, seed=0, max_pixels=cfg.max_image_pixels, min_size=cfg.min_image_size,
        decode_size=decode_target_size(image_size, train, cfg.crop_scale_min))
    if is_streaming(source):
        return StreamingCaptionDataset(source, builder, shuffle=train, seed=0,  # type: ignore[arg-type]
                                       window=cfg.stream_shuffle_window)
    return CaptionDataset(source, builder)  # type: ignore[arg-type]


class CaptionLoader:
    """Iterates batches for one rank; ``set_epoch(e)`` before each epoch; ``state_dict()`` mid-epoch to resume.

    Counts kept and skipped samples per epoch in ``skips`` (a ``SkipCounter``; reset when the epoch changes) and
    raises ``TooManySkippedError`` when more than ``max_skip_fraction`` fail. Batches whose samples were all skipped
    are counted but not yielded.
    """

    def __init__(self, loader: StatefulDataLoader, dataset: AnyCaptionDataset,
                 sampler: Optional[EpochDistributedSampler], max_skip_fraction: float,
                 slots: Optional[SharedBatchSlots] = None) -> None:
        self.loader = loader
        self.dataset = dataset
        self.sampler = sampler
        self.max_skip_fraction = max_skip_fraction
        self.slots = slots
        self._slot_pixels: dict[int, torch.Tensor] = {}  # this process's mapping of each slot, kept
        self.skips = SkipCounter()
        self._epoch = 0
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self.skips.reset()
        self._epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if isinstance(self.dataset, StreamingCaptionDataset):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (map-style only; before skips)."""
        if self.sampler is None:
            raise TypeError("a streaming loader has no length; count steps instead")
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.slots is not None:
            self.slots.release_all()
        for batch in self.loader:
            slot = batch.pop("pixel_slot", None)
            if slot is not None:
                if not self.loader.pin_memory:  # still the slot's memory: copy it out before the worker reuses it
                    batch["pixel_values"] = batch["pixel_values"].clone()
                # (pinned: the pin thread copied it already)
                self._slot_pixels[slot.index] = slot.pixels
                self.slots.release(slot.index)
            self.skips.update(batch)
            self.skips.check(self.max_skip_fraction, min_seen=MIN_SAMPLES_BEFORE_SKIP_CHECK)
            if len(batch["captions"]) == 0:
                continue
            yield batch
        self.skips.check(self.max_skip_fraction)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "loader": self.loader.state_dict(), "skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a rank's state: the next iteration yields what that epoch had not consumed yet."""
        self.set_epoch(int(state["epoch"]))
        self.loader.load_state_dict(state["loader"])
        self.skips.load_state_dict(state["skips"])


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_num_workers(setting: Union[int, str]) -> int:
    """``data.num_workers``: a count as it is, or "auto": the cores this process may use, shared by the training
    processes on this host (torchrun's LOCAL_WORLD_SIZE), less one for the training process. JPEG decoding is
    most of a worker's time, so a GPU's step rate needs about every core (BENCHMARKS.md)."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, cores // processes - 1)


def build_dataloader(dataset: AnyCaptionDataset, cfg: DataConfig, batch_size: int, *, train: bool, seed: int,
                     rank: int = 0, world_size: int = 1, tokenize: Optional[Tokenize] = None,
                     drop_last: Optional[bool] = None, num_workers: Union[int, str, None] = None) -> CaptionLoader:
    """A resumable loader over this rank's part of ``dataset``.

    train: shuffle by (seed, epoch) and (default) drop the last incomplete batch. Map-style ranks get equal
    counts (the sampler pads with a few repeated images; eval metrics should dedupe by image id). Eval loaders
    add ``all_captions``. ``tokenize(captions) -> {"input_ids", "attention_mask"}`` runs in the workers.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    num_workers = resolve_num_workers(cfg.num_workers if num_workers is None else num_workers)
    drop_last = train if drop_last is None else drop_last
    dataset.builder.seed = seed
    pin_memory = torch.cuda.is_available()
    # A worker has at most prefetch_factor batches in flight; one slot more for the batch being released.
    slots = SharedBatchSlots(num_workers, cfg.prefetch_factor + 2) if num_workers > 0 else None
    collate = CaptionCollator(dataset.builder.image_size, tokenize=tokenize, keep_all_captions=not train,
                              slots=slots)
    sampler: Optional[EpochDistributedSampler] = None
    if isinstance(dataset, StreamingCaptionDataset):
        dataset.seed = seed
        dataset.shuffle = train
        dataset.set_distributed(rank, world_size)
    else:
        sampler = EpochDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
    loader = StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=num_workers > 0, prefetch_factor=cfg.prefetch_factor if num_workers > 0 else None)
    return CaptionLoader(loader, dataset, sampler, cfg.max_skip_fraction, slots)
