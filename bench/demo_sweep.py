"""Train several variants of the demo at once and tabulate their validation metrics epoch by epoch.

    python bench/demo_sweep.py --variant base "" --variant attn "--model.loss.image_pooling attention" \
        [--common "--train.mixed_precision no"] [--parallel 4] [--out bench/results/sweep.json]

Each variant is ``src/train_stage1_vision_language.py --config configs/demo.yaml`` plus its overrides, in its own
log and checkpoint folder under ``--workdir``. The demo data is made once before the runs start, so they do not race
to write it. On a GPU machine the runs share the GPU; on CPU give each run its threads with --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from loravl.config import load_config
from loravl.data import ensure_demo_data

VALIDATION = re.compile(r"Validation: (.*)$")


def parse_metrics(line: str) -> dict[str, float]:
    out = {}
    for item in line.split():
        key, _, value = item.partition("=")
        out[key] = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
    ap.add_argument("--common", default="", help="overrides every variant gets")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--workdir", default="runs/demo_sweep")
    ap.add_argument("--out", default="")
    ap.add_argument("--time_limit", type=float, default=0, help="stop runs still going after this many seconds "
                    "and report the epochs they finished (0: no limit)")
    args = ap.parse_args()

    cfg = load_config(args.config, shlex.split(args.common))
    ensure_demo_data(cfg.data.train_path, cfg.data.demo_train_size, cfg.data.demo_val_size,
                     cfg.data.demo_image_size, cfg.data.demo_seed, cfg.data.demo_captions_per_image)

    workdir = Path(args.workdir)
    pending = list(args.variant)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results: dict[str, dict] = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    sweep_start = time.time()
    while pending or running:
        if args.time_limit and time.time() - sweep_start > args.time_limit:
            pending = []
        while pending and len(running) < args.parallel:
            name, overrides = pending.pop(0)
            run_dir = workdir / name
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "src/train_stage1_vision_language.py"), "--config", args.config,
                   *shlex.split(args.common), *shlex.split(overrides),
                   "--train.logging.dir", str(run_dir / "logs"), "--train.checkpoint.dir", str(run_dir / "ckpt")]
            log = open(run_dir / "stdout.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                             time.time())
            print(f"started {name}: {overrides}", flush=True)
        time.sleep(2)
        out_of_time = args.time_limit and time.time() - sweep_start > args.time_limit
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None and out_of_time:
                proc.terminate()  # the trainer saves a checkpoint on SIGTERM and exits
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.poll() is None:
                continue
            del running[name]
            text = (workdir / name / "stdout.log").read_text(errors="replace")
            epochs = [parse_metrics(m.group(1)) for m in map(VALIDATION.search, text.splitlines()) if m]
            overrides = dict(args.variant)[name]
            results[name] = {"overrides": overrides, "returncode": proc.returncode,
                             "seconds": round(time.time() - started, 1), "epochs": epochs}
            last = epochs[-1] if epochs else {}
            print(f"done {name} rc={proc.returncode} {results[name]['seconds']} s: "
                  f"i2t_r1={last.get('i2t_r1', float('nan')):.3f} t2i_r1={last.get('t2i_r1', float('nan')):.3f} "
                  f"exact={last.get('exact_match', float('nan')):.3f}", flush=True)

    keys = ("i2t_r1", "itm_i2t_r1", "t2i_r1", "exact_match")
    print("\nvariant".ljust(24) + "".join(k.rjust(12) for k in keys) + "   seconds   i2t_r1 by epoch")
    for name, r in results.items():
        last = r["epochs"][-1] if r["epochs"] else {}
        by_epoch = " ".join(f"{e.get('i2t_r1', 0) * 100:.0f}" for e in r["epochs"])
        print(name.ljust(23) + "".join(f"{100 * last.get(k, float('nan')):11.1f}%" for k in keys)
              + f"{r['seconds']:10.0f}   {by_epoch}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "common": args.common, "results": results},
                                             indent=1))


if __name__ == "__main__":
    main()
