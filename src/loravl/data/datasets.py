"""Torch datasets over the format readers: map-style (``CaptionDataset``) and streaming (``StreamingCaptionDataset``).

Both turn a ``RawRecord`` into a sample dict (pixel_values, caption, captions, image_id) or a ``Skip``. All
randomness of a sample (which caption, which crop) is seeded by (seed, epoch, key), never by worker RNG state,
so a resumed epoch reproduces the same samples whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from loravl.data import skips
from loravl.data.formats import RawRecord, RecordTable, ShardSource
from loravl.data.images import load_rgb_image
from loravl.data.skips import Skip

Sample = dict[str, Any]


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from its parts, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class SampleBuilder:
    """RawRecord -> sample dict, or a Skip saying why not."""

    transform: Callable
    image_size: int
    train: bool
    seed: int
    max_pixels: int
    min_size: int
    decode_size: Optional[int] = None

    def build(self, record: Union[RawRecord, Skip], epoch: int, key: int) -> Union[Sample, Skip]:
        if isinstance(record, Skip):
            return record
        if not record.captions:
            return Skip(skips.EMPTY_CAPTION, str(record.image)[:200] if isinstance(record.image, str) else "")
        if record.image is None:
            return Skip(skips.NO_IMAGE)
        image = load_rgb_image(record.image, max_pixels=self.max_pixels, min_size=self.min_size,
                               target_size=self.decode_size, as_tensor=True)
        if isinstance(image, Skip):
            source = record.image if isinstance(record.image, str) else f"image {record.image_id}"
            return Skip(image.reason, image.detail, source)
        if self.train:
            # One generator a sample draws the caption and the crop: seeded by (seed, epoch, key), not by any
            # process's RNG state, so a resumed epoch or another worker count gives the same samples.
            rng = random.Random(sample_seed(self.seed, epoch, key))
            caption = record.captions[rng.randrange(len(record.captions))]
            pixel_values = self.transform(image, rng)
        else:
            caption = record.captions[0]
            pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, "caption": caption, "captions": list(record.captions),
                "image_id": record.image_id}


class CaptionDataset(Dataset):
    """Map-style: one item per image. Indexed by ``(index, epoch)`` (what ``EpochBatchSampler`` yields, so
    persistent workers learn the epoch) or by a plain index (epoch 0)."""

    def __init__(self, table: RecordTable, builder: SampleBuilder) -> None:
        self.table = table
        self.builder = builder

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> Union[Sample, Skip]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            record = self.table.record(index)
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable row in an HF dataset
            return Skip(skips.READ_ERROR, f"{type(e).__name__}: {e}")
        return self.builder.build(record, epoch, index)


class StreamingCaptionDataset(IterableDataset):
    """Streams a ``ShardSource`` split over ranks and workers, resumable from ``state_dict()``.

    Each epoch (train only) the shard order is shuffled by (seed, epoch), and each shard is read in windows of
    ``window`` raw samples (still undecoded bytes) shuffled by (seed, epoch, shard, window start): a block shuffle
    that resumes exactly, unlike a running shuffle buffer. With at least as many shards as global workers
    (world_size x num_workers), worker g reads shards[g::total]; with fewer, every worker reads every shard and keeps
    raw samples g, g+total, ... so nothing is read twice by the same rank's batches and nothing is lost.

    The position (epoch, shard index in this worker's list, samples consumed in it, raw samples consumed in the
    epoch) is what StatefulDataLoader saves per worker; on resume the worker skips to the window holding that
    position without decoding anything it skips.
    """

    def __init__(self, source: ShardSource, builder: SampleBuilder, *, shuffle: bool, seed: int,
                 window: int = 256) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.source = source
        self.window = window
        self.builder = builder
        self.shuffle = shuffle
        self.seed = seed
        self.rank = 0
        self.world_size = 1
        # Shared with worker processes: persistent workers hold copies of this object, set_epoch must reach them.
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._position: Optional[dict[str, int]] = None
        self._pending: Optional[dict[str, int]] = None

    def set_distributed(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def _fresh_position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard_pos": 0, "offset": 0, "raw": 0}

    def state_dict(self) -> dict[str, int]:
        if self._pending is not None:
            return dict(self._pending)
        return dict(self._position) if self._position is not None else self._fresh_position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = {k: int(state[k]) for k in ("epoch", "shard_pos", "offset", "raw")}

    def __iter__(self) -> Iterator[Union[Sample, Skip]]:
        # Not a generator function: the position must be set when the iterator is made, since StatefulDataLoader
        # snapshots state right after creating it.
        start = self._pending if self._pending is not None else self._fresh_position()
        self._pending = None
        self._position = dict(start)
        return self._generate(start)

    def _plan(self, epoch: int) -> tuple[list[int], int, int]:
        """This worker's shards for ``epoch``, the global worker count and this worker's global index."""
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        total = self.world_size * num_workers
        me = self.rank * num_workers + worker_id
        order = list(range(len(self.source.shards)))
        if self.shuffle:
            random.Random(sample_seed("shards", self.seed, epoch)).shuffle(order)
        if len(order) >= total:
            return order[me::total], 1, 0
        return order, total, me

    def _generate(self, start: dict[str, int]) -> Iterator[Union[Sample, Skip]]:
        epoch = start["epoch"]
        shards, stride, me = self._plan(epoch)
        raw = start["raw"]
        for shard_pos in range(start["shard_pos"], len(shards)):
            shard = shards[shard_pos]
            offset = start["offset"] if shard_pos == start["shard_pos"] else 0
            # Resume at the start of the window holding `offset`: re-reading one window is cheap (no decoding),
            # and rebuilds the same shuffled window.
            window_start = offset - offset % self.window
            records = self.source.iter_shard(shard, window_start)
            while True:
                window = list(itertools.islice(records, self.window))
                broken = [r for r in window if isinstance(r, Skip) and r.reason == skips.UNREADABLE_SHARD]
                window = [r for r in window
                          if not (isinstance(r, Skip) and r.reason == skips.UNREADABLE_SHARD)]
                if broken and (stride == 1 or shard % stride == me):  # report a broken shard once
                    yield broken[0]
                if not window:
                    break
                if self.shuffle:
                    random.Random(sample_seed("window", self.seed, epoch, shard, window_start)).shuffle(window)
                for k in range(offset - window_start, len(window)):
                    record = window[k]
                    offset = window_start + k + 1
                    raw += 1
                    self._position = {"epoch": epoch, "shard_pos": shard_pos, "offset": offset, "raw": raw}
                    if (raw - 1) % stride != me:
                        continue
                    key = record.image_id if isinstance(record, RawRecord) else raw
                    yield self.builder.build(record, epoch, key)
                window_start += len(window)
            self._position = {"epoch": epoch, "shard_pos": shard_pos + 1, "offset": 0, "raw": raw}
