"""How long Python's garbage collector holds the training process: every collection's generation and duration
during a real training run (gc.callbacks), over the whole run and from its first step log line on (past the first
steps' compilation), and the objects the collector tracks at the end. The trainer's arguments pass through.

    python bench/gc_pauses.py --config configs/demo.yaml --train.epochs 5 --train.compile true \
        --data.demo_train_size 6400 --data.train_path /tmp/demo6400 --out gc.json

Large training loops often take the collector's full passes into their own hands (torchtitan's gc_freq) because
a full pass over a heap of compiled graphs takes long; this measures whether the trainer's steps ever wait for one.
"""
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loravl.config import main_config  # noqa: E402

collections: list[tuple[int, float, float, float]] = []  # (generation, start, seconds, wall clock)
_started = {}


def on_gc(phase: str, info: dict) -> None:
    now = time.perf_counter()
    if phase == "start":
        _started["t"] = now
    elif "t" in _started:
        start = _started.pop("t")
        collections.append((info["generation"], start, now - start, time.time()))


def steady_window(log: Path) -> tuple[int, int, float, float]:
    """Steps and wall-clock span from the run's first step log line to its last: past the first steps'
    compilation (1 s resolution)."""
    import datetime
    import re
    lines = [m for m in (re.match(r"(\S+ \S+) epoch \d+ \| step (\d+)/", line) for line in log.read_text().splitlines())
             if m]
    stamp = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() for m in (lines[0], lines[-1])]
    return int(lines[0].group(2)), int(lines[-1].group(2)), stamp[0] + 1.0, stamp[1]


def main() -> None:
    args = sys.argv[1:]
    out = None
    if "--out" in args:
        i = args.index("--out")
        out, args = args[i + 1], args[:i] + args[i + 2:]
    cfg = main_config(args, default_path="configs/stage1.yaml")
    from loravl.train import train

    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
    report = {"wall_s": wall, "tracked_objects_at_end": len(gc.get_objects())}
    steady = steady_window(Path(cfg.train.log_dir) / "training.log")
    for name, keep in (("whole run", lambda t: True),
                       (f"steps {steady[0]}-{steady[1]}", lambda t: steady[2] <= t <= steady[3])):
        report[name] = {}
        for g in range(3):
            times = [s for gen, _, s, wall_t in collections if gen == g and keep(wall_t)]
            report[name][f"generation {g}"] = {"count": len(times), "total_ms": 1000 * sum(times),
                                               "max_ms": 1000 * max(times, default=0.0)}
    report["gen2"] = [(round(start - t0, 2), round(1000 * s, 1)) for gen, start, s, _ in collections if gen == 2]
    print(json.dumps(report, indent=1))
    if out:
        Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
