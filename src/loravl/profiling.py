"""``train.profile``: torch.profiler over a window of training steps, written as Chrome traces and operator tables."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from .config import ProfileConfig
from .runtime import DistributedEnv

logger = logging.getLogger("loravl.train")


class StepProfiler:
    """``train.profile.dir``: ``torch.profiler`` over the ``profile_steps`` steps after step ``profile_start_step``,
    on every rank. Writes ``rank<r>_steps<a>-<b>.json`` (a Chrome trace: chrome://tracing, ui.perfetto.dev, or
    ``python bench/trace_gaps.py`` for where the GPU waits) and ``rank<r>_steps<a>-<b>_ops.txt`` (the top
    operators by device and by host time)."""

    def __init__(self, cfg: ProfileConfig, env: DistributedEnv):
        self.folder = Path(cfg.dir) if cfg.dir else None
        self.start_after, self.stop_after = cfg.start_step, cfg.start_step + cfg.steps
        self.env = env
        self.profiler: Optional[torch.profiler.profile] = None

    def step_done(self, step: int) -> None:
        if self.folder is None:
            return
        if self.profiler is None and step == self.start_after:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.env.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        elif self.profiler is not None and step >= self.stop_after:
            self.close(step)

    def close(self, step: int) -> None:
        """Stop (at the end of the window, or when training ends inside it) and write the files."""
        if self.profiler is None or self.folder is None:
            return
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)  # the last step's kernels belong in the trace
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"rank{self.env.rank}_steps{self.start_after + 1}-{step}"
        profiler.export_chrome_trace(str(stem.with_suffix(".json")))
        table = profiler.key_averages()
        by_device = "self_cuda_time_total" if self.env.device.type == "cuda" else "self_cpu_time_total"
        stem.with_name(stem.name + "_ops.txt").write_text(
            table.table(sort_by=by_device, row_limit=40, max_name_column_width=80) + "\n\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80))
        logger.info("Profiled steps %d-%d: %s", self.start_after + 1, step, stem.with_suffix(".json"))
        self.folder = None  # one profile per run
