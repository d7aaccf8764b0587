"""The real trainer on 1..N GPUs of one host: throughput and scaling, the LoRA phase switch, kill and resume.

    python3 bench/multi_gpu.py --gpus 1,2 --out /tmp/multi            # nvidia-h200-x2
    python3 bench/multi_gpu.py --gpus 1,2,8 --num_jpegs 50000 ...     # nvidia-h200-x8 (issue 8)
    python3 bench/multi_gpu.py --gpus 1 --one_gpu_ddp ...             # one GPU: the trainer with and without DDP

For each GPU count it launches ``torchrun --nproc_per_node=N src/train_stage1_vision_language.py`` on synthetic
640x480 JPEGs written to local disk (the stage-1 recipe with dinov2-base, random weights, batch 128 per GPU,
compiled), switching LoRA on after ``--lora_warmup_steps`` steps, and reads images/s from the training log (global,
all ranks; the first log intervals, which hold compilation, are left out). Then, at the largest count, it kills
the run right after a checkpoint with SIGKILL, runs ``--resume latest`` and checks that training continues from
that step. Prints a table and writes ``results.json`` under ``--out``.

``--one_gpu_ddp`` adds a run of one process under DDP (``train.use_ddp``): what each rank of a multi-GPU run
executes (gradient buckets and their all-reduce, the compiled graph split at the buckets), without a second GPU.
Its ratio to the plain one-GPU run is the part of the scaling efficiency DDP's own work costs; the traffic
between GPUs is not in it. Each run compiles into an inductor cache of its own (``inductor_cache`` in its folder),
so that its compile times (from the log: a phase's first line to its first step line) are a fresh compile's, and
``bench/inductor_kernel_configs.py`` can compare what two runs tuned.

Each interval's data wait (the share of it rank 0 waited for its loader) says who set the pace: near 0 while the
prefetch queue that the workers filled during compilation lasts, well above 0 where decoding did. Read scaling
from intervals where it is near 0 in every run; a run longer than the queue shows both.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LINE = re.compile(r"step (\d+)/\d+ .*\| ([\d.]+) img/s(?: \| data wait (\d+)%)?")
# NVLink multicast stays off on shared hosts (device README).
ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
       "PYTHONUNBUFFERED": "1"}


def trainer_command(n: int, args, run_dir: Path, manifest: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            str(ROOT / "src/train_stage1_vision_language.py"), "--config", str(ROOT / "configs/stage1.yaml"),
            "--model.vision.pretrained", str(ROOT / "configs/models/dinov2-base"), "--model.vision.random_init", "true",
            "--data.format", "jsonl", "--data.train_path", str(manifest), "--data.num_workers", str(args.workers),
            "--train.batch_size", str(args.batch_size), "--train.max_steps", str(args.steps),
            "--train.lora_warmup_steps", str(args.lora_warmup_steps), "--train.warmup_steps", "10",
            "--train.logging.every", str(args.log_every), "--train.compile.enabled", "true", "--train.num_gpus", str(n),
            "--train.logging.dir", str(run_dir / "logs"), "--train.checkpoint.dir", str(run_dir / "checkpoints"),
            *shlex.split(args.extra), *extra]


def log_intervals(log: Path) -> list[dict]:
    """Each log line's step, img/s and data wait (the share of the interval rank 0 waited for its loader)."""
    out = []
    for m in map(LINE.search, log.read_text().splitlines()):
        if m:
            out.append({"step": int(m.group(1)), "images_per_s": float(m.group(2)),
                        "data_wait_percent": int(m.group(3)) if m.group(3) else None})
    return out


def images_per_second(log: Path, first_step: int, last_step: int) -> float | None:
    """Median of the logged img/s over log intervals ending in (first_step, last_step]."""
    rates = [i["images_per_s"] for i in log_intervals(log) if first_step < i["step"] <= last_step]
    return statistics.median(rates) if rates else None


def median_data_wait(log: Path, first_step: int, last_step: int) -> float | None:
    """Median data wait over those intervals. Well above a few percent, the loader set the pace there, not the
    GPUs: while the workers' prefetch queue (filled during compilation) lasts, it reads near 0."""
    waits = [i["data_wait_percent"] for i in log_intervals(log)
             if first_step < i["step"] <= last_step and i["data_wait_percent"] is not None]
    return statistics.median(waits) if waits else None


def compile_seconds(text: str) -> dict[str, float]:
    """Per phase, seconds from its "Phase N" line to its first step line: mostly compilation (log stamps are whole
    seconds, and the first log_every steps run inside it)."""
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) "
    starts = {m.group(2): m.group(1) for m in re.finditer(stamp + r"Phase (\d): LoRA adapters", text)}
    out = {}
    for phase, start in starts.items():
        after = text[text.index(f"{start} Phase {phase}:"):]
        first = re.search(stamp + r"epoch \d+ \| step \d+/", after)
        if first:
            seconds = (datetime.fromisoformat(first.group(1)) - datetime.fromisoformat(start)).total_seconds()
            out[f"phase{phase}_compile_s"] = seconds
    return out


def run(n: int, args, manifest: Path, ddp: bool = False) -> dict:
    run_dir = Path(args.out) / (f"gpus{n}_ddp" if ddp else f"gpus{n}")
    extra = ["--train.checkpoint.save_every", str(args.save_every or args.steps), *(["--train.use_ddp", "true"] if ddp else [])]
    cmd = trainer_command(n, args, run_dir, manifest, extra)
    cache = run_dir / "inductor_cache"
    shutil.rmtree(cache, ignore_errors=True)  # a fresh compile: no kernels or tuning results from an earlier run
    t0 = time.time()
    proc = subprocess.run(cmd, env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                          timeout=args.timeout)
    (run_dir / "stdout.txt").write_text(proc.stdout + proc.stderr)
    log = run_dir / "logs/training.log"
    text = log.read_text() if log.exists() else ""
    # Leave out the intervals that hold compilation: the first two of each phase.
    skip = 2 * args.log_every
    result = {
        "gpus": n, "ddp": ddp or n > 1, "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1),
        **compile_seconds(text),
        "phase1_images_per_s": images_per_second(log, skip, args.lora_warmup_steps) if text else None,
        "phase2_images_per_s": images_per_second(log, args.lora_warmup_steps + skip, args.steps) if text else None,
        "phase1_data_wait_percent": median_data_wait(log, skip, args.lora_warmup_steps) if text else None,
        "phase2_data_wait_percent": median_data_wait(log, args.lora_warmup_steps + skip, args.steps) if text else None,
        "intervals": log_intervals(log) if text else [],
        "phase1_lines": text.count("Phase 1: LoRA adapters FROZEN"),
        "phase2_lines": text.count("Phase 2: LoRA adapters UNFROZEN"),
        "replica_checks": re.findall(r"Replica check at step \d+: .*", text),
        "memory": re.findall(r"mem ([\d.]+)GiB", text)[-1:],
    }
    if proc.returncode != 0:
        result["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def kill_and_resume(n: int, args, manifest: Path) -> dict:
    """Kill (SIGKILL) right after the first checkpoint, then --resume latest: does it continue from there?"""
    run_dir = Path(args.out) / f"resume_gpus{n}"
    save_every = args.lora_warmup_steps + 10  # the checkpoint holds phase 2 (the optimizer's LoRA group)
    # A run far longer than the kill point, so that the kill always lands mid-training.
    cmd = trainer_command(n, args, run_dir, manifest, ["--train.checkpoint.save_every", str(save_every),
                                                       "--train.max_steps", str(10 * args.steps)])
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = run_dir / "checkpoints/latest"
    while not latest.exists() and proc.poll() is None:  # the pointer moves last: a complete checkpoint is there
        time.sleep(0.1)
    left = kill_all(proc)
    saved_step = int(re.search(r"(\d+)\s*$", latest.read_text()).group(1)) if latest.exists() else None
    target = (saved_step or 0) + 20
    killed_log = (run_dir / "logs/training.log").read_text()
    resumed = subprocess.run(cmd + ["--train.resume", "latest", "--train.max_steps", str(target)],
                             env=ENV, capture_output=True, text=True, timeout=args.timeout)
    after = (run_dir / "logs/training.log").read_text()[len(killed_log):]  # what the resumed run wrote
    m = re.search(r"Resumed from (\S+) at epoch (\d+) step (\d+)", after)
    steps_after = [int(s) for s in re.findall(r"step (\d+)/", after)]
    stops = re.findall(r"Training stopped at epoch \d+ step (\d+)", after)
    return {"gpus": n, "killed_after_step": saved_step, "processes_left_after_kill": left,
            "resume_returncode": resumed.returncode, "resumed_line": m.group(0) if m else None,
            "first_logged_step_after_resume": min(steps_after, default=None),
            "last_logged_step": max(steps_after, default=None), "stopped_at": stops,
            "resumed_as_expected": bool(m and int(m.group(3)) == saved_step and stops == [str(target)]
                                        and steps_after == sorted(steps_after) and max(steps_after) == target),
            "error_tail": None if resumed.returncode == 0 else (resumed.stdout + resumed.stderr)[-3000:]}


def kill_all(proc: subprocess.Popen) -> int:
    """SIGKILL torchrun and every process under it, as a crash would; returns how many are still alive after.

    torchrun starts each worker in a session of its own, out of reach of ``killpg`` on torchrun's group, so the
    tree is listed by parent pid first and each process killed by pid.
    """
    def parents() -> dict[int, int]:
        out = {}
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit():
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if fields[0] != "Z":  # a zombie is dead already
                        out[int(entry.name)] = int(fields[1])
            except OSError:  # exited meanwhile
                pass
        return out

    tree, ppid = [proc.pid], parents()
    for pid in tree:  # breadth first: grows while it runs
        tree += [child for child, parent in ppid.items() if parent == pid]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while set(tree[1:]) & set(parents()) and time.time() < deadline:  # until the kernel has reaped them
        time.sleep(0.1)
    return len(set(tree[1:]) & set(parents()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2")
    p.add_argument("--num_jpegs", type=int, default=50000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lora_warmup_steps", type=int, default=60)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--workers", type=int, default=6, help="loader workers per GPU")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--save_every", type=int, default=0, help="checkpoint interval of the timing runs (default: "
                   "at the end only; an epoch end saves too)")
    p.add_argument("--one_gpu_ddp", action="store_true",
                   help="after the 1-GPU run, one process under DDP (train.use_ddp): DDP's own cost, without a "
                        "second GPU")
    p.add_argument("--skip_resume", action="store_true")
    p.add_argument("--resume_only", action="store_true", help="only the kill-and-resume check, no timing runs")
    p.add_argument("--extra", default="", help="more trainer overrides, e.g. a tiny model for a CPU smoke test")
    p.add_argument("--out", default="/tmp/loravl_multi_gpu")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from common import write_jpegs

    jpegs = out / "jpegs"
    t0 = time.time()
    write_jpegs(jpegs, args.num_jpegs)
    print(f"{args.num_jpegs} JPEGs ready in {time.time() - t0:.0f}s", flush=True)

    results = {"runs": [], "args": vars(args)}
    counts = [] if args.resume_only else [int(x) for x in args.gpus.split(",")]
    runs = [(n, ddp) for n in counts for ddp in ((False, True) if n == 1 and args.one_gpu_ddp else (False,))]
    for n, ddp in runs:
        r = run(n, args, jpegs / "manifest.jsonl", ddp)
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    base = results["runs"][0] if results["runs"] else None
    for r in results["runs"]:
        for phase in ("phase1", "phase2"):
            one, many = base[f"{phase}_images_per_s"], r[f"{phase}_images_per_s"]
            if one and many:
                r[f"{phase}_scaling_efficiency"] = many / (one * r["gpus"] / base["gpus"])
    if not args.skip_resume:
        results["resume"] = kill_and_resume(max(int(x) for x in args.gpus.split(",")), args, jpegs / "manifest.jsonl")
        print(json.dumps(results["resume"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    def label(r: dict) -> str:
        return f"{r['gpus']}{' DDP' if r['ddp'] and r['gpus'] == 1 else ''}"

    for r in results["runs"]:  # a loader-bound stretch shows as data wait well above 0
        print(f"{label(r)} GPU(s), step: img/s (data wait %): " + ", ".join(
            f"{i['step']}: {i['images_per_s']:.0f} ({i['data_wait_percent']})" for i in r["intervals"]))
    # eff.: against the plain 1-GPU run (for "1 DDP", what DDP's own work leaves of it); compile: seconds from
    # the phase's first log line to its first step line
    print(f"\n{'GPUs':>5} {'phase 1 img/s':>14} {'per GPU':>8} {'eff.':>6} {'wait':>5} {'phase 2 img/s':>14} "
          f"{'per GPU':>8} {'eff.':>6} {'wait':>5} {'compile 1':>9} {'compile 2':>9}")
    for r in results["runs"]:
        def fmt(phase):
            v, e, w = (r.get(f"{phase}_images_per_s"), r.get(f"{phase}_scaling_efficiency"),
                       r.get(f"{phase}_data_wait_percent"))
            wait = f"{w:>4.0f}%" if w is not None else f"{'-':>5}"
            return (f"{v:>14.0f} {v / r['gpus']:>8.0f} {e * 100 if e else float('nan'):>5.1f}% {wait}" if v
                    else f"{'-':>14} {'-':>8} {'-':>6} {'-':>5}")
        compiles = " ".join(f"{r[k]:>8.0f}s" if k in r else f"{'-':>9}" for k in ("phase1_compile_s",
                                                                                 "phase2_compile_s"))
        print(f"{label(r):>5} {fmt('phase1')} {fmt('phase2')} {compiles}")


if __name__ == "__main__":
    main()
