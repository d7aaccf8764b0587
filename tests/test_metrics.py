"""loravl.metrics: every log step gets its line, each line's rate and data wait are its own steps', and the hint
when the loader sets the pace."""
import re
import time
from collections import Counter
from pathlib import Path

import torch

from loravl.checkpoint import TrainState
from loravl.config import LoggingConfig
from loravl.metrics import LOSS_NAMES, MetricsLogger, setup_logging
from loravl.runtime import DistributedEnv


def test_a_log_line_at_every_log_step_whatever_max_bad_steps(tmp_path):
    """The metrics are read back from the device in chunks; each log step must end one, or its line is never
    written (log_every 26 with max_bad_steps 10 once logged only steps 130 and 208 of 208). A flush between log
    steps (an epoch's end, a checkpoint) must not cost the next line either."""

    setup_logging(tmp_path, rank=0)
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    metrics = MetricsLogger(LoggingConfig(dir=str(tmp_path), every=7), 3, env, 60, start_step=0)
    step_metrics = {**{n: torch.tensor(1.0) for n in (*LOSS_NAMES, "grad_norm")}, "bad": torch.tensor(0.0),
                    "images": 4, "skipped": Counter()}
    for step in range(1, 61):
        metrics.record(TrainState(step=step), step_metrics, lrs=[1e-4])
        if step in (10, 25):
            metrics.flush()
    metrics.flush()
    metrics.close()
    logged = [int(m) for m in re.findall(r"step (\d+)/60", (tmp_path / "training.log").read_text())]
    assert logged == [*range(7, 57, 7), 60]


def log_with_waits(log_dir: Path, waits_s: list[float], step_s: float = 0.05, to_hint: bool = True) -> str:
    """The training log of a MetricsLogger (log_every 1, on the CPU) whose steps waited ``waits_s`` for data,
    each then stepping for ``step_s``. The waits are real: sleeps inside ``waiting_for_data`` and outside it."""

    setup_logging(log_dir, rank=0)
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    metrics = MetricsLogger(LoggingConfig(dir=str(log_dir), every=1), 10, env, len(waits_s), start_step=0,
                            hint_when_loader_bound=to_hint)
    step_metrics = {**{n: torch.tensor(1.0) for n in (*LOSS_NAMES, "grad_norm")}, "bad": torch.tensor(0.0),
                    "images": 4, "skipped": Counter()}
    for step, wait_s in enumerate(waits_s, start=1):
        with metrics.waiting_for_data():
            if wait_s:  # no sleep at all for none: a busy machine's scheduling would add a wait of its own
                time.sleep(wait_s)
        time.sleep(step_s)
        metrics.record(TrainState(step=step), step_metrics, lrs=[1e-4])
    metrics.flush()
    metrics.close()
    return (log_dir / "training.log").read_text()


def test_a_log_lines_data_wait_and_rate_are_its_own_steps(tmp_path):
    """A line is written READ_BACK_LAG steps after its log step, once the metrics are back from the device; its
    data wait and img/s must still be those of its own steps. Before, they were timed up to the writing: the line
    of step 1 held step 3's wait (and the first line three steps), and a wait moved to the line before it."""
    text = log_with_waits(tmp_path, [0.0, 0.0, 0.2, 0.0, 0.0])
    waits = [int(w) for w in re.findall(r"data wait (\d+)%", text)]
    rates = [float(r) for r in re.findall(r"\| ([\d.]+) img/s", text)]
    assert len(waits) == len(rates) == 5, text
    # 80% for the step that waited; a few ms of a busy machine's scheduling in the others
    assert waits[2] >= 60 and max(waits[:2] + waits[3:]) <= 20, waits
    # 4 images a step: about 80 img/s for a 50 ms step, 16 for the step that also waited 200 ms
    assert rates[2] < 0.5 * min(rates[:2] + rates[3:]), rates


def test_the_log_says_once_when_the_loader_sets_the_pace(tmp_path):
    """Three log lines in a row that waited a fifth of their interval or more for data bring one line naming the
    remedies, however long the wait goes on; a run whose waits stay short, or pass the mark only now and then (an
    epoch's start), gets none, and so does a run that is not to hint (the trainer's on the CPU, where more workers
    would take cores from the step)."""
    run_intervals = log_with_waits
    hint = "The data loader sets the pace: data wait"
    bound = run_intervals(tmp_path / "bound", [0.0] * 3 + [0.05] * 8)
    assert bound.count(hint) == 1 and "src/shrink_images.py" in bound and "data.num_workers" in bound
    assert run_intervals(tmp_path / "fed", [0.0] * 11).count(hint) == 0
    assert run_intervals(tmp_path / "now_and_then", [0.0, 0.05, 0.05, 0.0, 0.05, 0.05, 0.0, 0.0]).count(hint) == 0
    assert run_intervals(tmp_path / "not_to_hint", [0.05] * 8, to_hint=False).count(hint) == 0
