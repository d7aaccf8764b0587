"""The ways a job ends and a checkpoint gets damaged, tried on the real trainer (a tiny model on the CPU, gloo), with
what came of each: a table of trials and outcomes.

    python bench/fault_matrix.py --out bench/results/fault_matrix.json

Stop trials start a run in a session of its own (as a batch scheduler does), wait for its steps, then signal it;
the outcome is the exit status, the trainer's own stop line and whether the newest checkpoint verifies. Damage
trials take a finished run with two checkpoints, damage the newest, and resume with ``--resume latest``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loravl.checkpoint import LATEST, newest_usable_checkpoint
from loravl.integrity import CheckpointError, verify

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "src" / "train_stage1_vision_language.py")
TINY = ["--config", "configs/demo.yaml", "--model.vision.image_size", "28", "--model.compressor.hidden_dim", "24",
        "--model.compressor.embed_dim", "16", "--model.text.hidden_size", "32", "--model.text.num_heads", "2",
        "--model.text.max_length", "12", "--model.text.vocab_size", "320", "--model.fusion.num_heads", "2",
        "--model.loss.embed_dim", "16", "--model.loss.queue_size", "32", "--data.demo_image_size", "32",
        "--data.demo_val_size", "4", "--data.val_path", "", "--train.batch_size", "4", "--train.logging.every", "1",
        "--train.warmup_steps", "3", "--train.lora_warmup_epochs", "1", "--data.demo_train_size", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def args_for(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY, "--data.train_path", str(data), "--train.logging.dir", str(run_dir / "logs"),
            "--train.checkpoint.dir", str(run_dir / "ckpt"), *extra]


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, SCRIPT]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]


def log(run_dir: Path) -> str:
    path = run_dir / "logs" / "training.log"
    return path.read_text() if path.is_file() else ""


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "logs" / "steps.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def checkpoint_state(run_dir: Path) -> str:
    directory = run_dir / "ckpt"
    if any(p.name.startswith(".tmp-") for p in directory.glob("*")):
        return "a .tmp folder left"
    try:
        folder = directory / (directory / LATEST).read_text().strip()
        verify(folder)
        return f"latest {folder.name} verifies"
    except (OSError, CheckpointError) as e:
        return f"latest unusable: {e}"


def stop_trial(name: str, work: Path, data: Path, nproc: int, deliver, wrap: list[str] = ()) -> dict:
    run_dir = work / name
    cmd = [*wrap, *launcher(nproc), *args_for(run_dir, data, "--train.epochs", "5000", "--data.num_workers", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while steps_logged(run_dir) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    started = time.time()
    if deliver is not None:
        deliver(proc)
    output, _ = proc.communicate(timeout=240)
    # The ranks of a killed launcher outlive it: wait for their stop line.
    while "Training stopped" not in log(run_dir) and time.time() < started + 120:
        time.sleep(0.5)
    stop = re.search(r"Received (.*?): checkpoint saved at step (\d+) in ([\d.]+)s", log(run_dir))
    return {"trial": name, "exit": proc.returncode,
            "outcome": f"saved step {stop.group(2)} in {stop.group(3)} s ({stop.group(1)})" if stop else
            "no stop line: " + (output.strip().splitlines() or ["(no output)"])[-1][:160],
            "checkpoint": checkpoint_state(run_dir)}


def damage_trial(name: str, work: Path, finished: Path, data: Path, damage) -> dict:
    run_dir = work / name
    shutil.copytree(finished, run_dir)
    damage(run_dir / "ckpt")
    done = subprocess.run([*launcher(1), *args_for(run_dir, data, "--train.epochs", "3", "--resume", "latest")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    text = log(run_dir)
    passed = re.findall(r"Resume: passed over (\S+): (.*)", text)
    resumed = re.search(r"Resumed from .*/(step_\d+) at", text)
    error = next((line for line in done.stderr.splitlines() if "error:" in line), "")
    outcome = (f"resumed from {resumed.group(1)}" if resumed else f"stopped: {error.split(' (')[0][:120]}") + "".join(
        f"; passed over {n} ({why.split(': ', 1)[-1][:90]})" for n, why in passed)
    return {"trial": name, "exit": done.returncode, "outcome": outcome,
            "checkpoint": checkpoint_state(run_dir) if done.returncode == 0 else "unchanged"}


def overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def newest(ckpt: Path) -> Path:
    return newest_usable_checkpoint(ckpt)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="loravl_faults_"))
    data = work / "data"
    rows = []
    group = lambda sig: lambda p: os.killpg(p.pid, sig)  # noqa: E731
    direct = lambda sig: lambda p: os.kill(p.pid, sig)  # noqa: E731
    rows.append(stop_trial("SIGTERM to the trainer", work, data, 1, direct(signal.SIGTERM)))
    rows.append(stop_trial("SIGTERM to its process group", work, data, 1, group(signal.SIGTERM)))
    rows.append(stop_trial("SIGINT to its process group (Ctrl-C)", work, data, 1, group(signal.SIGINT)))
    rows.append(stop_trial("timeout 25 python ...", work, data, 1, None, wrap=["timeout", "25"]))
    rows.append(stop_trial("SIGTERM to torchrun (2 ranks)", work, data, 2, direct(signal.SIGTERM)))
    rows.append(stop_trial("timeout 35 torchrun ... (2 ranks)", work, data, 2, None, wrap=["timeout", "35"]))
    rows.append(stop_trial("SIGKILL to torchrun (2 ranks)", work, data, 2, direct(signal.SIGKILL)))

    finished = work / "finished"
    subprocess.run([*launcher(1), *args_for(finished, data, "--train.epochs", "2")], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    rows.append(damage_trial("random bytes in the newest model.safetensors", work, finished, data,
                             lambda c: overwrite_middle(newest(c) / "model.safetensors")))
    rows.append(damage_trial("truncated rank_0.pt", work, finished, data,
                             lambda c: (newest(c) / "rank_0.pt").write_bytes(b"")))
    rows.append(damage_trial("corrupt optimizer.pt", work, finished, data,
                             lambda c: overwrite_middle(newest(c) / "optimizer.pt")))
    rows.append(damage_trial("train_state.json without 'step'", work, finished, data,
                             lambda c: (newest(c) / "train_state.json").write_text('{"epoch": 2}')))
    rows.append(damage_trial("garbage in latest", work, finished, data, lambda c: (c / LATEST).write_bytes(b"\xff\x00")))
    rows.append(damage_trial("latest empty", work, finished, data, lambda c: (c / LATEST).write_text("")))
    rows.append(damage_trial("every checkpoint damaged", work, finished, data, lambda c: [
        overwrite_middle(f / "model.safetensors") for f in c.glob("step_*")]))
    again = subprocess.run([*launcher(1), *args_for(finished, data, "--train.epochs", "2")], cwd=ROOT, env=ENV,
                           capture_output=True, text=True)
    rows.append({"trial": "a fresh run into the finished run's folder", "exit": again.returncode,
                 "outcome": next((line for line in again.stderr.splitlines() if "error" in line), "")[:200],
                 "checkpoint": checkpoint_state(finished)})

    print("| trial | exit | outcome | checkpoint after |\n| --- | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['trial']} | {r['exit']} | {r['outcome']} | {r['checkpoint']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
