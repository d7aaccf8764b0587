"""Skip markers for broken samples, and counting them.

A dataset never raises on a bad file: it returns a ``Skip`` carrying the reason. The collate function drops the
markers and puts a ``collections.Counter`` of reasons in ``batch["skipped"]``; counts travel inside the batch, so
they survive worker processes without shared state.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

# The reasons a sample can be skipped (the keys of batch["skipped"]).
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
EMPTY_CAPTION = "empty_caption"
NO_IMAGE = "no_image"
UNREADABLE_SHARD = "unreadable_shard"
READ_ERROR = "read_error"


@dataclass(frozen=True)
class Skip:
    """Stands in for a sample that could not be used; ``source`` names its file where one is known."""

    reason: str
    detail: str = ""
    source: str = ""

    def describe(self) -> str:
        """"photos/a.jpg (corrupt_image: image file is truncated)", for the log's first skipped samples."""
        detail = readable_detail(self.detail, self.source)
        what = f"{self.reason}: {detail}" if detail and detail != self.source else self.reason
        return f"{self.source} ({what})" if self.source else what


def readable_detail(detail: str, source: str = "") -> str:
    """PIL names the in-memory stream it read (``<_io.BytesIO object at 0x...>``): name the file instead."""
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", source or "the image", detail or "")


class TooManySkippedError(RuntimeError):
    """Most samples of an epoch failed: the data is broken, training on what is left would be meaningless."""


def check_skip_fraction(counter: Mapping[str, int], seen: int, max_skip_fraction: float, *,
                        min_seen: int = 0) -> None:
    """Raise ``TooManySkippedError`` when more than ``max_skip_fraction`` of ``seen`` samples were skipped.

    ``seen`` counts every sample the loader looked at (kept and skipped). Below ``min_seen`` nothing is decided, so
    a few bad files at the start of an epoch do not stop a run.
    """
    skipped = sum(counter.values())
    if seen <= 0 or seen < min_seen:
        return
    if skipped / seen > max_skip_fraction:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in Counter(counter).most_common())
        raise TooManySkippedError(
            f"{skipped} of {seen} samples ({skipped / seen:.0%}) could not be loaded, more than "
            f"data.max_skip_fraction={max_skip_fraction}; reasons: {reasons}. Check the data paths and files.")


# How many skipped samples of each reason an epoch's log line names.
EXAMPLES_PER_REASON = 3


@dataclass
class SkipCounter:
    """Per-epoch totals of kept and skipped samples, fed batch by batch (``update(batch)``), for the log and the
    skip-fraction check.

    ``reasons`` counts each bad file once: an image with five captions is five samples but one broken file, and
    ``merge`` unites the files several ranks saw. Skips with no file named (an empty caption, a bad row) count as
    samples. The fraction check counts samples, what the epoch actually lost.
    """

    seen: int = 0  # samples looked at, kept and skipped
    samples: Counter = field(default_factory=Counter)  # skipped samples by reason
    files: dict = field(default_factory=dict)  # reason -> set of the files skipped for it
    unnamed: Counter = field(default_factory=Counter)  # skipped samples with no file, by reason
    examples: dict = field(default_factory=dict)  # reason -> the first few described

    @property
    def reasons(self) -> Counter:
        return Counter({r: len(self.files.get(r, ())) + self.unnamed[r]
                        for r in set(self.files) | set(self.unnamed)})

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    @property
    def samples_skipped(self) -> int:
        return sum(self.samples.values())

    @property
    def fraction(self) -> float:
        return self.samples_skipped / self.seen if self.seen else 0.0

    def update(self, batch: Mapping[str, Any]) -> None:
        skipped: Counter = batch["skipped"]
        self.samples.update(skipped)
        self.seen += len(batch["captions"]) + sum(skipped.values())
        for reason, source, described in batch.get("skipped_samples", ()):
            if source:
                named = self.files.setdefault(reason, set())
                if source in named:
                    continue
                named.add(source)
            else:
                self.unnamed[reason] += 1
            self._add_example(reason, described)

    def _add_example(self, reason: str, described: str) -> None:
        named = self.examples.setdefault(reason, [])
        if len(named) < EXAMPLES_PER_REASON and described not in named:
            named.append(described)

    def merge(self, other: "SkipCounter") -> None:
        """Add another rank's epoch: samples add up, files are united."""
        self.seen += other.seen
        self.samples.update(other.samples)
        self.unnamed.update(other.unnamed)
        for reason, sources in other.files.items():
            self.files.setdefault(reason, set()).update(sources)
        for reason, described in other.examples.items():
            for d in described:
                self._add_example(reason, d)

    def check(self, max_skip_fraction: float, *, min_seen: int = 0) -> None:
        check_skip_fraction(self.samples, self.seen, max_skip_fraction, min_seen=min_seen)

    def reset(self) -> None:
        self.seen = 0
        self.samples, self.unnamed = Counter(), Counter()
        self.files, self.examples = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "samples": dict(self.samples), "unnamed": dict(self.unnamed),
                "files": {r: sorted(f) for r, f in self.files.items()},
                "examples": {r: list(e) for r, e in self.examples.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.seen = int(state["seen"])
        if "samples" not in state:  # saved before files were told apart: every skip was a sample
            self.samples = Counter(state["reasons"])
            self.unnamed = Counter(state["reasons"])
            return
        self.samples, self.unnamed = Counter(state["samples"]), Counter(state["unnamed"])
        self.files = {r: set(f) for r, f in state["files"].items()}
        self.examples = {r: list(e) for r, e in state["examples"].items()}
