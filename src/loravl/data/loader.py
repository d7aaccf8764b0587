"""``build_dataset`` and ``build_dataloader``: distributed, resumable, multi-worker loading of any format.

Map-style data goes through torchdata's ``StatefulDataLoader`` with a stateful distributed batch sampler; streaming
data (webdataset, HF streaming) through the same loader with a dataset that saves its own per-worker position.
Either way ``CaptionLoader.state_dict()`` is this rank's state: save one per rank, load it into the same rank with
the same world size and num_workers.

A map-style train loader runs on from one epoch into the next: its workers decode the next epoch's first batches
while the trainer ends an epoch (log, checkpoint, evaluation), instead of all starting on an empty queue at the
epoch's first step (BENCHMARKS.md, epoch start row).
"""
from __future__ import annotations

import logging
import math
import os
import signal
from typing import Any, Iterator, Optional, Union

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torch.utils.data import DistributedSampler

from loravl.config import DataConfig
from loravl.data.collate import CaptionCollator, SharedBatchSlots, Tokenize
from loravl.data.datasets import CaptionDataset, SampleBuilder, StreamingCaptionDataset
from loravl.data.formats import is_streaming, open_source
from loravl.data.images import build_transform, decode_target_size
from loravl.data.skips import SkipCounter

AnyCaptionDataset = Union[CaptionDataset, StreamingCaptionDataset]

# Mid-epoch the skip fraction is only judged after this many samples, so a few bad files early do not stop a run.
MIN_SAMPLES_BEFORE_SKIP_CHECK = 512

logger = logging.getLogger(__name__)


class EpochBatchSampler:
    """This rank's batches of a map-style dataset, epoch after epoch, each index tagged with its epoch: a batch is
    a list of ``(index, epoch)`` and never spans two epochs.

    The order of each epoch is torch's ``DistributedSampler``'s (shuffled by (seed, epoch), padded to equal counts
    on every rank). ``continuous``: the iteration runs on into the following epochs (the train loader); otherwise it
    ends with the epoch. The tag is how persistent worker processes learn the epoch (their copy of the dataset
    never sees set_epoch). Stateful: ``state_dict()`` is the position after the last batch handed out, which
    ``StatefulDataLoader`` records with each batch it dispatches and restores from.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, num_replicas: int, rank: int, shuffle: bool,
                 seed: int, drop_last: bool, continuous: bool) -> None:
        self.order = DistributedSampler(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                        seed=seed)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.continuous = continuous
        self.epoch = 0
        self._position = (0, 0)  # (epoch, batches of it handed out)
        self._resume_at: Optional[tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        """Where the next iteration starts (a restored state takes precedence)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        count = len(self.order)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.order.set_epoch(epoch)
        indices = list(self.order)
        return [indices[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, done = self._resume_at if self._resume_at is not None else (self.epoch, 0)
        self._resume_at = None
        while True:
            batches = self.epoch_batches(epoch)
            for k in range(done, len(batches)):
                self._position = (epoch, k + 1)
                yield [(index, epoch) for index in batches[k]]
            if not self.continuous:
                return
            epoch, done = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._position[0], "batches": self._position[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))


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

    Each pass (``iter``) yields one epoch. A map-style train loader keeps its iterator from one epoch to the next
    (``EpochBatchSampler.continuous``), so its workers never stop decoding at an epoch end; setting any other
    epoch than the next one starts a new pass there. Counts kept and skipped samples per epoch in ``skips`` (a
    ``SkipCounter``; reset when the epoch changes) and raises ``TooManySkippedError`` when more than
    ``max_skip_fraction`` fail. Batches whose samples were all skipped are counted but not yielded.
    """

    def __init__(self, loader: StatefulDataLoader, dataset: AnyCaptionDataset,
                 batch_sampler: Optional[EpochBatchSampler], max_skip_fraction: float,
                 slots: Optional[SharedBatchSlots] = None) -> None:
        self.loader = loader
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.max_skip_fraction = max_skip_fraction
        self.slots = slots
        self._slot_pixels: dict[int, torch.Tensor] = {}  # this process's mapping of each slot, kept
        self.skips = SkipCounter()
        self._epoch = 0
        self._batches_done = 0  # of this epoch, yielded or all skipped
        self._running: Optional[Iterator[dict[str, Any]]] = None  # the continuous iterator, between epochs
        self._restored = False  # load_state_dict: the next pass resumes mid-epoch
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def continuous(self) -> bool:
        return self.batch_sampler is not None and self.batch_sampler.continuous

    def set_epoch(self, epoch: int) -> None:
        if self._running is not None and not (epoch == self._epoch + 1 and self._batches_done == len(self)):
            self._running = None  # the next pass starts at ``epoch``, dropping what was decoded ahead
        if epoch != self._epoch:
            self.skips.reset()
            self._batches_done = 0
        self._epoch = epoch
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)
        if isinstance(self.dataset, StreamingCaptionDataset):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (map-style only; before skips)."""
        if self.batch_sampler is None:
            raise TypeError("a streaming loader has no length; count steps instead")
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._running is None:  # a new pass: from the epoch's start, or from a state just loaded
            if not self._restored:
                self._batches_done = 0
            self._restored = False
            if self.slots is not None:
                self.slots.release_all()  # batches left in flight by the last pass were dropped unread
            self._running = iter(self.loader)
        batches = self._running
        if not self.continuous:
            self._running = None
        per_epoch = len(self) if self.batch_sampler is not None else None  # streaming: until the iterator ends
        while per_epoch is None or self._batches_done < per_epoch:
            batch = next(batches, None)
            if batch is None:
                break
            self._batches_done += 1
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
        return {"epoch": self._epoch, "batches_done": self._batches_done, "loader": self.loader.state_dict(),
                "skips": self.skips.state_dict(), "num_workers": self.loader.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a rank's state: the next iteration yields what that epoch had not consumed yet.

        With another ``data.num_workers`` than the state was saved with (``auto`` on another host), the workers'
        own states do not fit: a map-style loader then starts its sampler at the saved position instead, which
        yields the same batches (each sample's crop is seeded by the sample, not the worker)."""
        if "batches_done" not in state:
            raise ValueError("this data loader state was saved by a loravl before the train loader ran on across "
                             "epochs (no 'batches_done'): resume from a checkpoint at an epoch's end, or with the "
                             "loravl that wrote it")
        epoch, batches_done = int(state["epoch"]), int(state["batches_done"])
        self.set_epoch(epoch)
        self._running = None
        self._batches_done, self._restored = batches_done, True
        saved_workers = state.get("num_workers")  # absent in states of earlier releases
        restored = False
        if saved_workers in (None, self.loader.num_workers):
            try:
                self.loader.load_state_dict(state["loader"])
                restored = True
            except (AssertionError, KeyError, ValueError):  # torchdata's words for another worker count
                pass
        if not restored:
            if self.batch_sampler is None:
                raise ValueError(f"a streaming loader resumes only with the data.num_workers it was saved with "
                                 f"({saved_workers if saved_workers is not None else 'another count'}; now "
                                 f"{self.loader.num_workers})")
            self.batch_sampler.load_state_dict({"epoch": epoch, "batches": batches_done})
            logger.info("Data loader: saved with %s worker(s), resumed with %d: restarted at epoch %d batch %d",
                        saved_workers if saved_workers is not None else "another count of", self.loader.num_workers,
                        epoch, batches_done)
        self.skips.load_state_dict(state["skips"])


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_num_workers(setting: Union[int, str]) -> int:
    """``data.num_workers``: a count as it is, or "auto": the cores this process may use, shared by the training
    processes on this host (torchrun's LOCAL_WORLD_SIZE), less one for the training process. JPEG decoding is
    most of a worker's time, so a GPU's step rate needs about every core (BENCHMARKS.md, loader rows)."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, cores // processes - 1)


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker ignores SIGTERM and SIGINT. Schedulers, ``timeout``, Ctrl-C and torchrun signal the whole
    process group; the trainer then finishes its step and saves, which needs the workers it would otherwise lose
    first (a worker killed by a signal takes the trainer down with it). Workers still exit with the trainer."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    workers = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": pin_memory,
               "persistent_workers": num_workers > 0, "prefetch_factor": cfg.prefetch_factor if num_workers else None,
               "worker_init_fn": ignore_stop_signals if num_workers else None}
    if isinstance(dataset, StreamingCaptionDataset):
        dataset.seed = seed
        dataset.shuffle = train
        dataset.set_distributed(rank, world_size)
        loader = StatefulDataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **workers)
        return CaptionLoader(loader, dataset, None, cfg.max_skip_fraction, slots)
    batch_sampler = EpochBatchSampler(len(dataset), batch_size, num_replicas=world_size, rank=rank, shuffle=train,
                                      seed=seed, drop_last=drop_last, continuous=train)
    loader = StatefulDataLoader(dataset, batch_sampler=batch_sampler, **workers)
    return CaptionLoader(loader, dataset, batch_sampler, cfg.max_skip_fraction, slots)
