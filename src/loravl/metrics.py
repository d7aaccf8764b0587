"""What the trainer writes: ``training.log`` (what users tail), ``steps.jsonl`` (every step) and TensorBoard scalars,
each step's metrics read back from the device without stalling it."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .checkpoint import TrainState
from .config import LoggingConfig, ModelConfig
from .data.skips import SkipCounter
from .runtime import DistributedEnv

logger = logging.getLogger("loravl.train")

LOSS_NAMES = ("loss_itc", "loss_itm", "loss_lm", "loss")
MEMORY_LOSS_NAMES = ("loss_memory_lm", "loss_memory_kl")


def loss_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The losses a model's forward returns and the logs carry: the text-only LM's with loss.text_lm_weight > 0,
    the memory's with memory.enabled."""
    text_lm = ("loss_text_lm",) if cfg.loss.text_lm_weight > 0 else ()
    memory = MEMORY_LOSS_NAMES if cfg.memory.enabled else ()
    return (*LOSS_NAMES[:-1], *text_lm, *memory, "loss")


def setup_logging(log_dir: Path, rank: int) -> None:
    """Rank 0: INFO to stdout and ``<log_dir>/training.log`` (appended). Other ranks: warnings to stderr."""
    root = logging.getLogger("loravl")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = False
    if rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        stdout = logging.StreamHandler(sys.stdout)
        stdout.setFormatter(logging.Formatter("%(message)s"))
        to_file = logging.FileHandler(log_dir / "training.log", mode="a")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(stdout)
        root.addHandler(to_file)
        root.setLevel(logging.INFO)
    else:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        root.addHandler(stderr)
        root.setLevel(logging.WARNING)


class MetricsLogger:
    """Keeps each step's metrics on the device and reads them back every few steps (log steps, and every
    ``max_bad_steps`` for the non-finite check) without waiting for the GPU: the read-back is a copy queued behind
    the steps, written out ``READ_BACK_LAG`` steps later, when it has landed. Waiting at once would drain the queue
    of steps the host has launched ahead, and leave the GPU idle while the host writes the logs. ``flush()`` writes
    everything (before a checkpoint, at the phase switch and an epoch end, at the end).

    Rank 0 writes ``<log_dir>/steps.jsonl`` (one line per step; a resumed run appends, the last line of a step
    wins), the log line and, at log steps, TensorBoard scalars (the interval's means). Values are averaged over
    ranks.
    """

    READ_BACK_LAG = 2  # steps between a read-back's start and its writing
    # A hint, once a run, when this many log lines in a row waited this share of their interval or more for data:
    # an epoch's start waits for a line or two, a loader-bound run every line (BENCHMARKS.md, loader rows).
    LOADER_BOUND_LINES, LOADER_BOUND_WAIT = 3, 0.2

    def __init__(self, logging_cfg: LoggingConfig, max_bad_steps: int, env: DistributedEnv, total_steps: int,
                 start_step: int, hint_when_loader_bound: bool = False, losses: tuple[str, ...] = LOSS_NAMES):
        self.env, self.total_steps = env, total_steps
        self.loss_names = losses
        self.NAMES, self.SCALARS = (*losses, "grad_norm", "bad"), (*losses, "grad_norm")
        self.log_every, self.max_bad_steps = logging_cfg.every, max_bad_steps
        log_dir = Path(logging_cfg.dir)
        self.pending: list[tuple[int, int, int, dict[str, Any], list[float]]] = []
        # Read-backs on their way to the host: (steps, host tensor, CUDA event or None), oldest first.
        self.in_flight: list[tuple[list, torch.Tensor, Optional[torch.cuda.Event]]] = []
        self.bad_streak = 0
        self.interval_sums: Counter = Counter()  # TensorBoard's means over the current log interval
        self.interval_steps = 0
        self.last_step, self.images = start_step, 0
        self.data_wait_s = 0.0  # the host's wait for batches since the last log step
        # Each log interval's (seconds, data wait seconds, steps), taken when its last step is recorded: its line is
        # written READ_BACK_LAG steps later, and those steps' time and waits belong to the next line.
        self.interval_marks: dict[int, tuple[float, float, int]] = {}
        self.recent_data_waits: list[float] = []  # the last log lines' data wait shares
        self.hint_when_loader_bound, self.told_loader_bound = hint_when_loader_bound, False
        self.writer = self.jsonl = self.progress = None
        if env.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
            self.jsonl = open(log_dir / "steps.jsonl", "a", encoding="utf-8")
            if sys.stdout.isatty():
                from tqdm import tqdm

                self.progress = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
        self.last_time = time.perf_counter()  # after the writers' setup: the first line times steps only

    @record_function("loravl: metrics")
    def record(self, state: TrainState, step_metrics: dict[str, Any], lrs: list[float]) -> None:
        self.pending.append((state.step, state.epoch, state.phase, step_metrics, lrs))
        if self.progress is not None:
            self.progress.update(1)
        # A read-back ends at every log step (its line is written with the last step read back) and every
        # max_bad_steps steps (the non-finite check).
        step = state.step
        log_step = step % self.log_every == 0 or step >= self.total_steps
        if log_step:
            now = time.perf_counter()
            self.interval_marks[step] = (now - self.last_time, self.data_wait_s, step - self.last_step)
            self.last_time, self.last_step, self.data_wait_s = now, step, 0.0
        if log_step or step % self.max_bad_steps == 0:
            self._start_read_back()
        self._write_landed(up_to_step=step - self.READ_BACK_LAG)

    def flush(self) -> None:
        """Write out every step recorded so far (waits for the GPU)."""
        self._start_read_back()
        self._write_landed(up_to_step=None)

    def _start_read_back(self) -> None:
        if not self.pending:
            return
        values = torch.stack([torch.stack([m[n] for n in self.NAMES]) for _, _, _, m, _ in self.pending])
        if self.env.world_size > 1:
            # The image count is a global sum (ranks may have skipped different numbers of samples).
            images = torch.tensor([float(m["images"]) for _, _, _, m, _ in self.pending],
                                  pin_memory=values.is_cuda).to(values.device, non_blocking=True)
            values = torch.cat([values, images[:, None]], dim=1)
            dist.all_reduce(values)
            values[:, :-1] /= self.env.world_size
        landed = None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)  # into pinned memory, behind the steps
            landed = torch.cuda.Event()
            landed.record()
        self.in_flight.append((self.pending, values, landed))
        self.pending = []

    def _write_landed(self, up_to_step: Optional[int]) -> None:
        """Write the read-backs of steps up to ``up_to_step`` (None: all), waiting for any still on its way. A fixed
        step, not whichever has landed, so every rank writes (and stops on a bad streak) at the same step."""
        while self.in_flight and (up_to_step is None or self.in_flight[0][0][-1][0] <= up_to_step):
            steps, values, landed = self.in_flight.pop(0)
            if landed is not None:
                landed.synchronize()  # READ_BACK_LAG steps later the copy has landed: the host is not that far ahead
            self._write_steps(steps, values.tolist())

    def _write_steps(self, pending: list, rows: list[list[float]]) -> None:
        for (step, epoch, phase, m, lrs), row in zip(pending, rows):
            record = dict(zip(self.NAMES, row))
            skipped = record.pop("bad") > 0
            self.bad_streak = self.bad_streak + 1 if skipped else 0
            self.images += int(row[len(self.NAMES)]) if self.env.world_size > 1 else m["images"]
            if skipped and self.env.rank == 0:
                logger.warning("Step %d skipped: non-finite loss or gradients (loss %s, grad norm %s)", step,
                               record["loss"], record["grad_norm"])
            if self.env.rank == 0:
                self._write(step, epoch, phase, record, lrs, skipped, m["skipped"])
            if not skipped:
                for name in self.SCALARS:
                    self.interval_sums[name] += record[name]
                self.interval_steps += 1
        step, epoch = pending[-1][0], pending[-1][1]
        if step % self.log_every == 0 or step >= self.total_steps:
            self._log_line(step, epoch, rows[-1], pending[-1][4])
        if self.bad_streak >= self.max_bad_steps:
            raise FloatingPointError(f"{self.bad_streak} steps in a row had non-finite losses or gradients "
                                     f"(train.max_bad_steps={self.max_bad_steps}); stopping without saving")

    def _write(self, step: int, epoch: int, phase: int, record: dict[str, float], lrs: list[float],
               skipped: bool, skip_counts: Counter) -> None:
        line = {"step": step, "epoch": epoch, "phase": phase, **{k: record[k] for k in (*self.loss_names, "grad_norm")},
                "lr": lrs, "skipped_step": skipped, "skipped_samples": sum(skip_counts.values())}
        self.jsonl.write(json.dumps(line) + "\n")

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Times the wait for the next batch. The host runs ahead of the GPU, so it waits here only when the data
        loader cannot keep up: the log line's ``data wait`` is that share of the interval."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait_s += time.perf_counter() - started

    def _log_line(self, step: int, epoch: int, row: list[float], lrs: list[float]) -> None:
        elapsed, data_wait_s, steps = self.interval_marks.pop(step)
        images_per_s = self.images / elapsed if elapsed > 0 else 0.0
        data_wait = min(1.0, data_wait_s / elapsed) if elapsed > 0 else 0.0
        eta = (self.total_steps - step) * elapsed / max(steps, 1)
        self.images = 0
        losses = " ".join(f"{n} {v:.4f}" for n, v in zip(self.loss_names, row))
        memory = ""
        if self.env.device.type == "cuda":
            memory = f" | mem {torch.cuda.max_memory_allocated(self.env.device) / 2**30:.1f}GiB"
        lr_text = ",".join(f"{lr:.2e}" for lr in lrs)
        logger.info("epoch %d | step %d/%d | %s | lr %s | %.1f img/s | data wait %.0f%%%s | eta %s", epoch, step,
                    self.total_steps, losses, lr_text, images_per_s, 100 * data_wait, memory,
                    time.strftime("%H:%M:%S", time.gmtime(eta)))
        self._hint_if_loader_bound(data_wait)
        if self.jsonl is not None:
            self.jsonl.flush()
            # TensorBoard gets each log interval's mean (its steps that were not skipped), not every step: every
            # scalar is Python time on the host while the GPU may wait (seen in a train.profile.dir trace with
            # bench/trace_gaps.py). steps.jsonl keeps every step.
            for name in self.SCALARS:
                if self.interval_steps:
                    self.writer.add_scalar(f"train/{name}", self.interval_sums[name] / self.interval_steps, step)
            for i, lr in enumerate(lrs):
                self.writer.add_scalar(f"lr/group_{i}", lr, step)
            self.writer.add_scalar("perf/images_per_s", images_per_s, step)
            self.writer.add_scalar("perf/data_wait_fraction", data_wait, step)
        self.interval_sums, self.interval_steps = Counter(), 0

    def _hint_if_loader_bound(self, data_wait: float) -> None:
        self.recent_data_waits = [*self.recent_data_waits, data_wait][-self.LOADER_BOUND_LINES:]
        if (not self.hint_when_loader_bound or self.told_loader_bound or self.env.rank != 0
                or len(self.recent_data_waits) < self.LOADER_BOUND_LINES
                or min(self.recent_data_waits) < self.LOADER_BOUND_WAIT):
            return
        self.told_loader_bound = True
        logger.info("The data loader sets the pace: data wait %.0f%% or more in the last %d log lines. More loader "
                    "workers (data.num_workers) or a copy of the data with its images shrunk to what the crops need "
                    "(src/shrink_images.py, data/README.md) would feed the steps faster.",
                    100 * min(self.recent_data_waits), self.LOADER_BOUND_LINES)

    def close(self) -> None:
        if self.env.rank == 0:
            self.jsonl.close()
            self.writer.close()
            if self.progress is not None:
                self.progress.close()


def format_skips(skips: SkipCounter) -> str:
    """The epoch's line: samples seen, bad files by reason (each once), the samples they cost, the first named."""
    if not skips.skipped:
        return f"{skips.seen} samples, none skipped"
    reasons = ", ".join(f"{r}: {n}" for r, n in skips.reasons.most_common())
    lost = f"; {skips.samples_skipped} samples lost" if skips.samples_skipped != skips.skipped else ""
    named = "; ".join(example for reason, _ in skips.reasons.most_common()
                      for example in skips.examples.get(reason, ()))
    return (f"{skips.seen} samples, {skips.skipped} skipped ({reasons}){lost}"
            + (f"; first: {named}" if named else ""))


def global_skips(skips: SkipCounter, env: DistributedEnv) -> SkipCounter:
    """Every rank's epoch counts as one (each bad file once, though its captions went to several ranks); called by
    every rank at an epoch's end."""
    if env.world_size == 1:
        return skips
    states: list = [None] * env.world_size
    dist.all_gather_object(states, skips.state_dict())
    total = SkipCounter()
    for state in states:
        rank_skips = SkipCounter()
        rank_skips.load_state_dict(state)
        total.merge(rank_skips)
    return total
