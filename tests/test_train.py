"""The stage-1 trainer end to end: real subprocesses (plain python and torchrun with gloo on CPU), tiny model,
demo data. Each test reads what the run wrote: steps.jsonl, training.log, checkpoints, dumped weights."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loravl.checkpoint import LATEST
from loravl.weights import read_weights

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "src" / "train_stage1_vision_language.py")
DUMP_SCRIPT = str(ROOT / "tests" / "train_dump_ranks.py")
RECORDED = ROOT / "tests" / "train_recorded_losses.json"

# The tiny model on demo.yaml: hidden 32, 28 px images (4 patches), batch 4, no loader workers.
TINY = [
    "--config", "configs/demo.yaml",
    "--model.vision.image_size", "28",
    "--model.compressor.hidden_dim", "24", "--model.compressor.embed_dim", "16",
    "--model.text.hidden_size", "32", "--model.text.num_heads", "2", "--model.text.max_length", "12",
    "--model.text.vocab_size", "320",
    "--model.fusion.num_heads", "2", "--model.loss.embed_dim", "16", "--model.loss.queue_size", "32",
    "--data.demo_image_size", "32", "--data.demo_val_size", "4", "--data.num_workers", "0", "--data.val_path", "",
    "--train.batch_size", "4", "--train.logging.every", "1", "--train.warmup_steps", "3", "--train.checkpoint.save_every", "100",
    "--train.checkpoint.keep_last", "10", "--train.lora_warmup_epochs", "1",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-data")


def run_args(run_dir: Path, data_root: Path, train_size: int, *extra: str) -> list[str]:
    return [*TINY, "--data.train_path", str(data_root / f"demo{train_size}"),
            "--data.demo_train_size", str(train_size),
            "--train.logging.dir", str(run_dir / "logs"), "--train.checkpoint.dir", str(run_dir / "ckpt"), *extra]


def command(args: list[str], nproc: int = 1, script: str = SCRIPT, script_args: tuple = ()) -> list[str]:
    if nproc == 1:
        return [sys.executable, script, *script_args, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
            *script_args, *args]


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 180, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(command(args, nproc, **kw), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def read_steps(run_dir: Path) -> dict[int, dict]:
    """Per-step records; a resumed run appends, the last record of a step wins."""
    steps = {}
    for line in (run_dir / "logs" / "steps.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record
    return steps


def losses(steps: dict[int, dict]) -> list[tuple]:
    return [(s, r["loss"], r["loss_itc"], r["loss_itm"], r["loss_lm"], r["lr"]) for s, r in sorted(steps.items())]


def log_text(run_dir: Path) -> str:
    return (run_dir / "logs" / "training.log").read_text()


def latest(run_dir: Path) -> str:
    return (run_dir / "ckpt" / LATEST).read_text().strip()


# Two ranks across the phase switch (also the recorded-losses guard)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("two-ranks")
    # 32 images, 2 ranks x batch 4: 4 steps per epoch; phase 2 from step 5.
    run(run_args(run_dir, data_root, 32, "--train.epochs", "2"), nproc=2, script=DUMP_SCRIPT,
        script_args=(str(run_dir / "dump"),))
    return run_dir


def test_two_ranks_switch_phase_once_and_stay_in_sync(two_rank_run, data_root):
    text = log_text(two_rank_run)
    # which data the run reads: a shrunk copy or the originals look alike in the step rates
    assert f"Data: demo {data_root / 'demo32'}, 0 loader worker(s) in this process" in text
    assert text.count("Phase 1: LoRA adapters FROZEN | Trainable params: ") == 1
    assert text.count("Phase 2: LoRA adapters UNFROZEN | Trainable params: ") == 1
    assert "LoRA injected into" in text
    phase1 = int(text.split("Phase 1: LoRA adapters FROZEN | Trainable params: ")[1].split()[0].replace(",", ""))
    phase2 = int(text.split("Phase 2: LoRA adapters UNFROZEN | Trainable params: ")[1].split()[0].replace(",", ""))
    rank0 = read_weights(two_rank_run / "dump" / "rank_0.safetensors")
    rank1 = read_weights(two_rank_run / "dump" / "rank_1.safetensors")
    lora_keys = [k for k in rank0 if "lora_" in k]
    assert phase2 - phase1 == sum(rank0[k].numel() for k in lora_keys)
    steps = read_steps(two_rank_run)
    assert [steps[s]["phase"] for s in sorted(steps)] == [1] * 4 + [2] * 4
    assert len(steps[5]["lr"]) == 3 and len(steps[4]["lr"]) == 2  # LoRA joined the optimizer at step 5

    # LoRA was frozen through phase 1 (the epoch-end checkpoint at step 4 holds its initial values) and trained
    # after the switch, identically on both ranks: the rebuilt DDP wrapper averages its gradients.
    at_switch = read_weights(two_rank_run / "ckpt" / "step_00000004" / "model.safetensors")
    assert all(not torch.equal(at_switch[k], rank0[k]) for k in lora_keys if "lora_B" in k)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # every trainable, LoRA, momentum and queue tensor


def test_recorded_losses_two_ranks(two_rank_run):
    """torchtitan-style guard: the first steps' losses of a fixed tiny run match the recorded values."""
    recorded = json.loads(RECORDED.read_text())
    got = [read_steps(two_rank_run)[s]["loss"] for s in range(1, len(recorded["loss"]) + 1)]
    if os.environ.get("LORAVL_RECORD_LOSSES"):  # after an intended change of the model or demo.yaml
        RECORDED.write_text(json.dumps({**recorded, "loss": got}, indent=1) + "\n")
    assert got == pytest.approx(recorded["loss"], abs=1e-4, rel=0)


# Exact resume


def test_exact_resume_chain_add_group(tmp_path, data_root):
    """One process, 3 epochs x 4 steps, phase 2 from step 5. Interrupted at step 2 (phase 1), 4 (epoch end, the
    resumed run makes the phase switch) and 6 (inside phase 2, optimizer with the LoRA group): every step's
    losses and learning rates equal the uninterrupted run's exactly."""
    common = ("--train.epochs", "3")
    reference = tmp_path / "reference"
    run(run_args(reference, data_root, 16, *common))
    resumed = tmp_path / "resumed"
    for stop in (2, 4, 6):
        run(run_args(resumed, data_root, 16, *common, "--train.stop_at_step", str(stop), "--train.resume", "latest"))
        assert latest(resumed) == f"step_{stop:08d}"
    run(run_args(resumed, data_root, 16, *common, "--train.resume", "latest"))
    expected, got = losses(read_steps(reference)), losses(read_steps(resumed))
    assert len(expected) == 12
    assert got == expected
    text = log_text(resumed)
    for step, epoch in ((2, 0), (4, 1), (6, 1)):
        assert f"Resumed from {resumed / 'ckpt' / f'step_{step:08d}'} at epoch {epoch} step {step}," in text
    # The final weights agree too, and the run ended with an export.
    final = f"step_{12:08d}"
    a = read_weights(reference / "ckpt" / final / "model.safetensors")
    b = read_weights(resumed / "ckpt" / final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "ckpt" / "export" / "vision_adapter" / "adapter_model.safetensors").is_file()


def test_exact_resume_recreate_two_ranks(tmp_path, data_root):
    """Two ranks, lora_unfreeze_optimizer=recreate, a loader worker per rank, 2 micro-batches per step, the
    momentum encoder, ITM negatives from the queue and the episodic memory; interrupted inside phase 2: per-rank
    RNG and loader states, the recreated optimizer's state, the momentum LoRA, the queue, the memory's terms."""
    common = ("--train.epochs", "3", "--train.lora_unfreeze_optimizer", "recreate", "--data.num_workers", "1",
              "--train.grad_accum_steps", "2", "--model.loss.momentum_encoder", "true",
              "--model.loss.itm_negatives", "queue", "--model.memory.enabled", "true", "--model.memory.slots", "4",
              "--model.memory.dim", "8", "--model.memory.episode_size", "2")
    reference = tmp_path / "reference"  # 2 steps per epoch; phase 2 from step 3
    run(run_args(reference, data_root, 32, *common), nproc=2)
    resumed = tmp_path / "resumed"
    run(run_args(resumed, data_root, 32, *common, "--train.stop_at_step", "3"), nproc=2)
    assert latest(resumed) == "step_00000003"
    assert (resumed / "ckpt" / "step_00000003" / "rank_1.pt").is_file()
    # Mid-epoch, each rank's data position belongs to the 2-way split: one process may not take it over.
    done = run(run_args(resumed, data_root, 32, *common, "--train.resume", "latest"), check=False)
    assert done.returncode == 2 and "the number of processes (2 -> 1; possible at an epoch's end)" in done.stderr
    run(run_args(resumed, data_root, 32, *common, "--train.resume", "latest"), nproc=2)
    assert losses(read_steps(resumed)) == losses(read_steps(reference))
    assert len(read_steps(reference)) == 6 and read_steps(reference)[3]["phase"] == 2
    assert all(r["loss_memory_lm"] > 0 for r in read_steps(reference).values())


def test_phase_lines_stay_true_across_resumes_on_two_ranks(tmp_path, data_root):
    """Stopped in phase 1, at the switch and in phase 2, each time resumed (2 ranks): the log holds one
    "Phase 1" line (the fresh start), one "Phase 2" line (the switch, written when it happened, after the resume
    that reached it), and each resume's own line naming its phase and trainable parameters."""
    run_dir = tmp_path / "run"  # 32 images, 2 ranks x batch 4: 4 steps an epoch, phase 2 from step 5
    args = run_args(run_dir, data_root, 32, "--train.epochs", "3")
    run(args + ["--train.stop_at_step", "2"], nproc=2)  # in phase 1
    run(args + ["--train.resume", "latest", "--train.stop_at_step", "4"], nproc=2)  # the last step before the switch
    run(args + ["--train.resume", "latest", "--train.stop_at_step", "6"], nproc=2)  # in phase 2
    run(args + ["--train.resume", "latest"], nproc=2)
    text = log_text(run_dir)
    assert text.count("Phase 1: LoRA adapters FROZEN") == 1 and text.count("Phase 2: LoRA adapters UNFROZEN") == 1
    resumes = re.findall(r"Resumed from .*step_(\d+) at epoch \d+ step \d+, in phase (\d) \(LoRA (\w+)\)", text)
    assert resumes == [("00000002", "1", "frozen"), ("00000004", "1", "frozen"), ("00000006", "2", "trains")]
    order = [text.index(s) for s in ("Phase 1: LoRA", "step_00000002 at epoch", "step_00000004 at epoch",
                                       "Phase 2: LoRA", "step_00000006 at epoch")]
    assert order == sorted(order)
    assert max(read_steps(run_dir)) == 12


def coco_with_bad_files(root: Path) -> Path:
    """A COCO captions set of 36 good images and 5 bad files (4 broken, 1 missing), each bad file listed under two
    image ids (so two samples, which may go to different ranks), two captions per image."""
    import io

    from PIL import Image

    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for i in range(36):
        Image.new("RGB", (40, 40), (7 * i % 256, 50, 200 - 5 * i)).save(root / "train2017" / f"{i:04d}.jpg")
        images.append({"id": i, "file_name": f"{i:04d}.jpg"})
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64)).save(jpeg, "JPEG")
    Image.new("RGB", (1, 1)).save(png, "PNG")
    bad = {"cut.jpg": jpeg.getvalue()[:300], "empty.jpg": b"", "text.jpg": b"not a picture\n" * 20,
           "tiny.png": png.getvalue()}
    for name, data in bad.items():
        (root / "train2017" / name).write_bytes(data)
    for j, name in enumerate([*bad, "missing.jpg"]):
        images += [{"id": 100 + j, "file_name": name}, {"id": 200 + j, "file_name": name}]
    annotations = [{"id": 2 * k + c, "image_id": im["id"], "caption": f"{('a red', 'a blue')[c]} scene {im['id'] % 4}"}
                   for k, im in enumerate(images) for c in range(2)]
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_each_bad_file_is_counted_once_per_epoch_across_ranks_workers_and_a_resume(tmp_path, data_root):
    """2 ranks with a loader worker each, a loader that runs on across epochs, a stop mid-epoch and a resume:
    every epoch's line counts each of the 5 bad files once, over all ranks, and says how many samples they cost."""
    annotations = coco_with_bad_files(tmp_path / "coco")
    run_dir = tmp_path / "run"  # 46 samples, 2 ranks x batch 4: 5 steps an epoch
    args = run_args(run_dir, data_root, 32, "--data.format", "coco", "--data.train_path", str(annotations),
                    "--data.val_path", "", "--data.num_workers", "1", "--data.max_skip_fraction", "0.5",
                    "--train.epochs", "3")
    run(args + ["--train.stop_at_step", "7"], nproc=2)  # mid-epoch 1
    run(args + ["--train.resume", "latest"], nproc=2)
    lines = re.findall(r"Epoch (\d) done: (.*)", log_text(run_dir))
    assert [epoch for epoch, _ in lines] == ["0", "1", "2"], lines
    for _, line in lines:
        counts = dict(re.findall(r"(\w+): (\d+)", line.split(")")[0]))
        assert counts == {"corrupt_image": "1", "empty_file": "1", "not_an_image": "1", "too_small": "1",
                          "missing_file": "1"}, line
        # drop_last: 5 full steps of 2 x 4 = 40 samples a epoch; the files' 10 samples, less those dropped.
        lost = int(re.search(r"; (\d+) samples lost", line).group(1))
        assert line.startswith("40 samples, 5 skipped (") and 5 < lost <= 10, line


def test_momentum_distillation_ramps_in_from_zero(tmp_path, data_root):
    """ALBEF's alpha ramp, through the trainer: its first step distils with alpha 0, so its loss is exactly that of
    a run without distillation; without the ramp the first step's loss differs."""
    common = ("--train.epochs", "1", "--train.stop_at_step", "2")
    first_loss = {}
    for name, extra in (("none", ("--model.loss.distill_alpha", "0")),
                        ("ramped", ("--model.loss.distill_alpha", "0.4")),  # over the first epoch
                        ("unramped", ("--model.loss.distill_alpha", "0.4", "--model.loss.distill_alpha_ramp_steps",
                                      "0"))):
        run(run_args(tmp_path / name, data_root, 16, *common, *extra))
        first_loss[name] = read_steps(tmp_path / name)[1]["loss_itc"]
    assert first_loss["ramped"] == first_loss["none"]
    assert first_loss["unramped"] != first_loss["none"]


def test_ddp_over_one_process_trains_as_one_process_does(tmp_path, data_root):
    """train.use_ddp on one process: the model trains under DDP (a one-process group), through its re-wrap at the
    phase switch and no_sync over 2 micro-batches, and every step's losses equal the plain process's."""
    common = ("--train.epochs", "2", "--train.grad_accum_steps", "2")  # 2 steps per epoch; phase 2 from step 3
    plain, ddp = tmp_path / "plain", tmp_path / "ddp"
    run(run_args(plain, data_root, 16, *common))
    done = run(run_args(ddp, data_root, 16, *common, "--train.use_ddp", "True"))
    assert "is deprecated" not in done.stderr, done.stderr
    assert "Run: 1 process(es) on cpu, precision fp32, DDP over one process (train.use_ddp)" in log_text(ddp)
    assert "DDP over one process" not in log_text(plain)
    steps = read_steps(ddp)
    assert len(steps) == 4 and steps[3]["phase"] == 2
    assert losses(steps) == losses(read_steps(plain))  # one rank's all-reduce averages over 1: exact


@pytest.mark.parametrize("split", [True, False])
def test_compiled_forward_under_ddp_splits_at_buckets_only_where_asked(tiny_model_config, tiny_tokenizer, split):
    """The compiled training forward under DDP (one process), with dynamo's optimize_ddp as the trainer sets it
    from train.ddp_split_compiled_graph: split at DDP's gradient buckets or one graph; either way eager's loss and
    gradients. A wider text model (6 MB of gradients) fills several buckets of 1 MB, DDP's first bucket's size and
    the smallest that dynamo's split takes."""
    import dataclasses

    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.parallel import DistributedDataParallel as DDP

    from conftest import tiny_batch
    from loravl.model import VisionLanguageModel

    cfg = dataclasses.replace(tiny_model_config,  # dropout off: compiled code draws its own random numbers
                              text=dataclasses.replace(tiny_model_config.text, dropout=0.0, hidden_size=256),
                              compressor=dataclasses.replace(tiny_model_config.compressor, dropout=0.0))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    previous = torch._dynamo.config.optimize_ddp
    try:
        torch._dynamo.config.optimize_ddp = split
        counter = CompileCounterWithBackend("aot_eager")
        results = []
        for compiled in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = VisionLanguageModel(cfg, tiny_tokenizer).train()
            if compiled:
                model.compile(scope="forward", backend=counter)
            ddp = DDP(model, bucket_cap_mb=1, broadcast_buffers=False)
            torch.manual_seed(1)  # the same hard-negative draws in both runs
            out = ddp(**tiny_batch(tiny_tokenizer, 4))
            out["loss"].backward()
            results.append((out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()
                                                   if p.grad is not None}))
    finally:
        torch._dynamo.config.optimize_ddp = previous
        torch._dynamo.reset()
        dist.destroy_process_group()
    assert (counter.frame_count > 1) if split else (counter.frame_count == 1), counter.frame_count
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# Crashes and signals


def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path, data_root):
    """Step 4's checkpoint is written in the background, slowly: the training goes on past it (steps 5 and 6 are
    recorded while step 4's folder is still temporary), and a SIGKILL then leaves ``latest`` at step 2, from which
    the run resumes."""
    run_dir = tmp_path / "run"
    args = run_args(run_dir, data_root, 16, "--train.epochs", "2", "--train.checkpoint.save_every", "2")
    proc = subprocess.Popen(command(args), cwd=ROOT, env=child_env(LORAVL_TEST_SLOW_SAVE="4:120"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tmp_checkpoint = run_dir / "ckpt" / ".tmp-step_00000004"
    steps_file = run_dir / "logs" / "steps.jsonl"
    try:
        deadline = time.time() + 120
        # step 4's pieces are being written, and step 6 waits for them at its own save
        while not ((tmp_checkpoint / "train_state.json").is_file() and steps_file.is_file()
                   and 6 in read_steps(run_dir)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        assert tmp_checkpoint.is_dir() and not (run_dir / "ckpt" / "step_00000004").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert latest(run_dir) == "step_00000002"
    assert not (run_dir / "ckpt" / "step_00000004").exists()
    run(args + ["--train.resume", "latest", "--train.stop_at_step", "5"])
    assert f"Resumed from {run_dir / 'ckpt' / 'step_00000002'} at epoch 0 step 2" in log_text(run_dir)
    assert latest(run_dir) == "step_00000005"
    assert not tmp_checkpoint.exists()
    assert sorted(read_steps(run_dir)) == [1, 2, 3, 4, 5, 6]  # step 6 is the killed run's


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            environ = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            out[int(environ["RANK"])] = int(proc.name)
    return out


def test_sigterm_mid_epoch_saves_and_exits_zero(tmp_path, data_root):
    """SIGTERM to one worker of a 2-rank run: both ranks finish the step, save the same checkpoint, exit 0."""
    run_dir = tmp_path / "run"
    args = run_args(run_dir, data_root, 32, "--train.epochs", "50")
    proc = subprocess.Popen(command(args, nproc=2), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    steps_file = run_dir / "logs" / "steps.jsonl"
    deadline = time.time() + 120
    while not (steps_file.is_file() and len(steps_file.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    workers = _worker_pids(proc.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    text = log_text(run_dir)
    assert "Received a stop signal on another rank: checkpoint saved at step" in text
    saved = latest(run_dir)
    step = int(saved.split("_")[1])
    assert step < 200 and step == max(read_steps(run_dir))
    assert (run_dir / "ckpt" / saved / "rank_0.pt").is_file() and (run_dir / "ckpt" / saved / "rank_1.pt").is_file()


# Preemption: every way a scheduler, `timeout` or torchrun ends a job saves a complete checkpoint


def start_run(args: list[str], nproc: int) -> subprocess.Popen:
    """The trainer in a session of its own, as a batch scheduler starts a job: its process group is the job's."""
    return subprocess.Popen(command(args, nproc=nproc), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, count: int, timeout: float = 120) -> None:
    steps_file = run_dir / "logs" / "steps.jsonl"
    deadline = time.time() + timeout
    while not (steps_file.is_file() and len(steps_file.read_text().splitlines()) >= count):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)


def assert_saved_on_stop(run_dir: Path, signal_name: str, ranks: int) -> None:
    text = log_text(run_dir)
    match = re.search(r"Received (\S+|a stop signal on another rank): checkpoint saved at step (\d+) in [\d.]+s", text)
    assert match, text[-2000:]
    assert match.group(1) in (signal_name, "a") and int(latest(run_dir).split("_")[1]) == int(match.group(2))
    saved = run_dir / "ckpt" / latest(run_dir)
    assert all((saved / f"rank_{r}.pt").is_file() for r in range(ranks))
    assert not [p for p in (run_dir / "ckpt").iterdir() if p.name.startswith(".tmp-")]


def test_sigterm_to_the_process_group_saves_with_loader_workers(tmp_path, data_root):
    """kill -TERM -- -PGID (SLURM, Kubernetes, `timeout` on a group): the loader's workers get the signal too. They
    must not die first and take the trainer with them; the trainer finishes its step, saves, exits 0."""
    run_dir = tmp_path / "run"
    proc = start_run(run_args(run_dir, data_root, 32, "--train.epochs", "50", "--data.num_workers", "1"), nproc=1)
    wait_for_steps(proc, run_dir, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert_saved_on_stop(run_dir, "SIGTERM", ranks=1)
    assert "is deprecated" not in output, output  # no library deprecation notes on every run


def test_sigterm_to_torchrun_saves_on_every_rank(tmp_path, data_root):
    """SIGTERM to the launcher: torchrun signals each rank's process group (the rank and its loader workers) and
    gives them 30 s before SIGKILL. Every rank saves the same step; the ranks exit 0."""
    run_dir = tmp_path / "run"
    proc = start_run(run_args(run_dir, data_root, 32, "--train.epochs", "50", "--data.num_workers", "1"), nproc=2)
    wait_for_steps(proc, run_dir, 2)
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "exitcode  : -9" not in output and "forcefully exiting" not in output, output[-3000:]
    assert_saved_on_stop(run_dir, "SIGTERM", ranks=2)


def test_ranks_stop_and_save_when_the_launcher_is_killed(tmp_path, data_root):
    """SIGKILL to torchrun leaves its ranks (in sessions of their own) without a launcher: each gets SIGTERM from
    the kernel (a parent-death signal), saves and exits, instead of training on as an orphan."""
    run_dir = tmp_path / "run"
    proc = start_run(run_args(run_dir, data_root, 32, "--train.epochs", "50"), nproc=2)
    wait_for_steps(proc, run_dir, 2)
    ranks = _worker_pids(proc.pid)
    assert set(ranks) == {0, 1}
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.time() + 120
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in ranks.values()):
        assert time.time() < deadline, "ranks still running without their launcher"
        time.sleep(0.5)
    assert_saved_on_stop(run_dir, "SIGTERM", ranks=2)


def test_a_second_fresh_run_into_the_same_folder_is_refused(tmp_path, data_root):
    """The newcomer runs the demo twice: the second run stops at start, saying how to resume, move or overwrite,
    and leaves the first run's checkpoints and tokenizer as they were."""
    run_dir = tmp_path / "run"
    run(run_args(run_dir, data_root, 16, "--train.epochs", "1"))  # lora_warmup_epochs 1: LoRA never trains
    assert "LoRA never trains in this run: phase 2 would start after its last step (train.epochs 1" in log_text(run_dir)
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "ckpt").rglob("*") if p.is_file()}
    done = run(run_args(run_dir, data_root, 16, "--train.epochs", "1"), check=False)
    assert done.returncode == 2 and "already holds a run" in done.stderr and "--resume latest" in done.stderr
    assert "config error: " in log_text(run_dir) and "already holds a run" in log_text(run_dir)  # users tail it
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "ckpt").rglob("*") if p.is_file()} == before
    run(run_args(run_dir, data_root, 16, "--train.epochs", "1", "--train.overwrite", "true"))
    assert "deleted 1 checkpoint(s) of the run" in log_text(run_dir)


def test_resume_latest_passes_over_a_damaged_checkpoint(tmp_path, data_root):
    """Bytes overwritten in the newest checkpoint's weights: --resume latest says which checkpoint it passed over
    and why, and resumes from the one before (the run then trains to its end)."""
    run_dir = tmp_path / "run"
    run(run_args(run_dir, data_root, 16, "--train.epochs", "2"))  # 4 steps an epoch: step 4 and step 8
    weights = run_dir / "ckpt" / "step_00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 32] = bytes(32)
    weights.write_bytes(bytes(data))
    run(run_args(run_dir, data_root, 16, "--train.epochs", "3", "--resume", "latest"))
    text = log_text(run_dir)
    assert re.search(r"Resume: passed over step_00000008: .*model.safetensors does not match the checksum", text)
    assert "Resumed from" in text and "step_00000004 at epoch 1 step 4" in text
    assert latest(run_dir) == "step_00000012"


def test_resume_refuses_settings_of_another_run_and_applies_those_that_may_change(tmp_path, data_root):
    """A resume compares its settings with the checkpoint's: a changed batch size (another run) stops it at start,
    naming the field; a changed worker count and learning rate are allowed, logged, and the new rate is used."""
    common = ("--train.epochs", "2", "--train.lr", "1e-3")
    reference, changed = tmp_path / "reference", tmp_path / "changed"
    for run_dir in (reference, changed):
        run(run_args(run_dir, data_root, 16, *common, "--train.stop_at_step", "2"))  # mid-epoch (4 steps each)
    done = run(run_args(changed, data_root, 16, *common, "--train.resume", "latest", "--train.batch_size", "8"),
               check=False)
    assert done.returncode == 2 and "train.batch_size (4 -> 8)" in done.stderr and "another run" in done.stderr
    run(run_args(reference, data_root, 16, *common, "--train.resume", "latest"))
    run(run_args(changed, data_root, 16, "--train.epochs", "2", "--train.lr", "2e-3", "--train.resume", "latest",
                 "--data.num_workers", "1"))
    text = log_text(changed)
    assert "Resume: data.num_workers changed from 0 to 1" in text and "Resume: train.lr changed from 0.001 to 0.002" in text
    assert "Data loader: saved with 0 worker(s), resumed with 1: restarted at epoch 0 batch 2" in text
    before, after = read_steps(reference), read_steps(changed)
    assert before[1]["lr"][0] == pytest.approx(1e-3 / 3)  # a line's rate is its own step's: warmup step 1 of 3
    assert after[2]["lr"][0] == pytest.approx(before[2]["lr"][0])  # written before the resume
    assert after[3]["lr"][0] == pytest.approx(2 * before[3]["lr"][0]) and after[8]["lr"][0] == pytest.approx(
        2 * before[8]["lr"][0])
    assert sorted(after) == list(range(1, 9))


# Configuration errors


def test_num_gpus_mismatch_fails_clearly(tmp_path, data_root):
    done = run(run_args(tmp_path, data_root, 16, "--num_gpus", "3", "--use_ddp", "True"), nproc=2, check=False)
    assert done.returncode != 0
    assert (done.stderr + done.stdout).count("config error: train.num_gpus is 3 but 2 process(es) were launched") == 1


def test_unknown_config_key_is_named(tmp_path, data_root):
    done = run(run_args(tmp_path, data_root, 16, "--train.lora_warmup_epoch", "2"), check=False)
    assert done.returncode == 2
    assert "lora_warmup_epoch" in done.stderr and "config error" in done.stderr


def test_a_wrong_validation_path_fails_at_the_start(tmp_path, data_root):
    annotations = coco_with_bad_files(tmp_path / "coco")
    done = run(run_args(tmp_path, data_root, 16, "--data.format", "coco", "--data.train_path", str(annotations),
                        "--data.val_path", str(tmp_path / "nowhere.json")), check=False)
    assert done.returncode == 2 and "nowhere.json" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "logs" / "steps.jsonl").exists()  # before any step


def test_short_demo_learns(tmp_path):
    """The demo recipe itself (configs/demo.yaml, its model and data), shortened: the captioning loss falls well
    below where it starts, through both phases, and the export is written."""
    args = ["--config", "configs/demo.yaml", "--data.train_path", str(tmp_path / "demo"),
            "--data.demo_train_size", "640", "--data.demo_val_size", "32", "--data.num_workers", "0",
            "--train.epochs", "3", "--train.lora_warmup_epochs", "2", "--train.warmup_steps", "10", "--train.logging.every", "5",
            "--train.logging.dir", str(tmp_path / "logs"), "--train.checkpoint.dir", str(tmp_path / "ckpt")]
    run(args, timeout=300)
    steps = read_steps(tmp_path)
    lm = [steps[s]["loss_lm"] for s in sorted(steps)]
    assert len(lm) == 30 and [steps[s]["phase"] for s in sorted(steps)][-1] == 2
    first, last = sum(lm[:5]) / 5, sum(lm[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # measured: 5.5 -> 2.5
    assert "Validation:" in log_text(tmp_path) and (tmp_path / "ckpt" / "export").is_dir()


def test_train_step_with_cuda_graphs_keeps_gradient_buffers(tiny_model_config, tiny_tokenizer):
    """With CUDA graphs (compile.mode reduce-overhead) gradients must accumulate into buffers of their own: autograd
    would otherwise install a graph's output buffer as .grad, and the next replay overwrites it. The step keeps the
    same .grad storage across micro-batches and steps, and updates the weights exactly as the default step does."""
    from collections import Counter

    from conftest import tiny_batch
    from loravl.config import CompileConfig, TrainConfig
    from loravl.model import VisionLanguageModel
    from loravl.device import choose_precision
    from loravl.optim import build_optimizer
    from loravl.runtime import DistributedEnv
    from loravl.train import train_step

    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    results = {}
    for mode in ("default", "reduce-overhead"):
        tc = TrainConfig(compile=CompileConfig(enabled=True, mode=mode), lr=1e-3)
        torch.manual_seed(0)
        model = VisionLanguageModel(tiny_model_config, tiny_tokenizer).train()  # eager: the step's logic only
        optimizer = build_optimizer(model, tc, env.device)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        storages = []
        for step in range(2):
            torch.manual_seed(step)
            batches = [{**tiny_batch(tiny_tokenizer, 4, image_ids=[8 * step + 4 * i + j for j in range(4)],
                                     seed=2 * step + i), "skipped": Counter()} for i in range(2)]
            train_step(model, batches, optimizer, choose_precision("no", env.device), tc, env)
            storages.append([None if p.grad is None else p.grad.data_ptr() for p in params])
        results[mode] = [p.detach().clone() for p in params]
        if mode == "default":
            assert all(s is None for s in storages[-1])
        else:
            assert None not in storages[0] and storages[0] == storages[1]
            assert all(not p.grad.any() for p in params)  # zeroed in place for the next step
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results["default"], results["reduce-overhead"]))


def test_train_step_with_cuda_graphs_and_one_micro_batch_keeps_no_buffers(tiny_model_config, tiny_tokenizer):
    """One micro-batch per step: nothing to accumulate, so no gradient buffers (and no add kernel per tensor); the
    gradients are dropped after the optimizer step, and the weights move exactly as with the default step."""
    from collections import Counter

    from conftest import tiny_batch
    from loravl.config import CompileConfig, TrainConfig
    from loravl.model import VisionLanguageModel
    from loravl.device import choose_precision
    from loravl.optim import build_optimizer
    from loravl.runtime import DistributedEnv
    from loravl.train import train_step

    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    results = {}
    for mode in ("default", "reduce-overhead"):
        tc = TrainConfig(compile=CompileConfig(enabled=True, mode=mode), lr=1e-3)
        torch.manual_seed(0)
        model = VisionLanguageModel(tiny_model_config, tiny_tokenizer).train()
        optimizer = build_optimizer(model, tc, env.device)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for step in range(2):
            torch.manual_seed(step)
            batch = {**tiny_batch(tiny_tokenizer, 4, image_ids=[4 * step + j for j in range(4)], seed=step),
                     "skipped": Counter()}
            train_step(model, [batch], optimizer, choose_precision("no", env.device), tc, env)
            assert all(p.grad is None for p in params), mode
        results[mode] = [p.detach().clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(results["default"], results["reduce-overhead"]))


def test_profile_trace_and_tensorboard_interval_means(tmp_path, data_root):
    """train.profile.dir: one trace and one operator table for steps profile.start_step+1 .. +profile.steps, named
    so, and a log line that says where; training goes on to its end. TensorBoard gets the mean of each log
    interval at its log step (steps.jsonl every step), and the share of it spent waiting for data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(run_args(tmp_path, data_root, 16, "--train.epochs", "2", "--train.profile.dir", str(tmp_path / "prof"),
                 "--train.profile.start_step", "2", "--train.profile.steps", "3", "--train.logging.every", "4"))
    events = EventAccumulator(str(tmp_path / "logs")).Reload()
    steps = read_steps(tmp_path)
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [4, 8]
    for step, value in logged:
        assert value == pytest.approx(sum(steps[s]["loss"] for s in range(step - 3, step + 1)) / 4, rel=1e-5)
    # No loader workers here: every batch is loaded while the trainer waits, a part of each interval but not all.
    waits = [e.value for e in events.Scalars("perf/data_wait_fraction")]
    assert len(waits) == 2 and all(0 < w < 1 for w in waits), waits
    assert "% | eta" in log_text(tmp_path) and "data wait " in log_text(tmp_path)
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["rank0_steps3-5.json", "rank0_steps3-5_ops.txt"]
    events = json.loads((tmp_path / "prof" / "rank0_steps3-5.json").read_text())["traceEvents"]
    assert any(e.get("name") == "Optimizer.step#AdamW.step" for e in events)
    assert "aten::" in (tmp_path / "prof" / "rank0_steps3-5_ops.txt").read_text()
    assert f"Profiled steps 3-5: {tmp_path / 'prof' / 'rank0_steps3-5.json'}" in log_text(tmp_path)
    assert max(read_steps(tmp_path)) == 8


def test_a_streak_of_non_finite_steps_stops_the_run_without_saving(tmp_path, data_root):
    """An infinite loss weight makes every step's gradients non-finite: each step is skipped (recorded as such),
    and after train.max_bad_steps in a row the run stops with an error naming the setting, saving nothing."""
    done = run(run_args(tmp_path, data_root, 32, "--train.epochs", "2", "--model.loss.lm_weight", "inf",
                        "--train.max_bad_steps", "3"), check=False)
    assert done.returncode != 0
    assert "3 steps in a row had non-finite losses or gradients (train.max_bad_steps=3)" in done.stderr
    steps = read_steps(tmp_path)
    assert sorted(steps) == [1, 2, 3] and all(r["skipped_step"] for r in steps.values())
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_")]
