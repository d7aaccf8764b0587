"""Stage-1 training: ``train(cfg)`` reads top to bottom; the distributed and bookkeeping details live in the small
helpers below it.

Two phases. Phase 1 (epochs before ``train.lora_warmup_epochs``, or steps before ``train.lora_warmup_steps``): LoRA
is frozen, the encoder runs without autograd, the compressor, fusion, text model and heads train. Phase 2: LoRA
trains too, at ``train.lora_lr``. The switch is ``unfreeze_lora`` and nothing else.

Launch with ``torchrun``, ``accelerate launch`` (both set RANK/WORLD_SIZE; DDP is set up here, not by Accelerate, so
the checkpoint holds exactly the live optimizer and schedule) or plain ``python`` for one process.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR
from torch.profiler import record_function  # labels in train.profile_dir's traces

from .checkpoint import (LATEST, Checkpointer, ModelWeights, RNGState, TrainState, caption_tokenizer,
                         read_train_state, resolve_checkpoint)
from .config import ConfigError, RunConfig, TrainConfig
from .data import build_dataloader, build_dataset
from .model import VisionLanguageModel
from .text import CaptionTokenizer, train_tokenizer

logger = logging.getLogger("loravl.train")

LOSS_NAMES = ("loss_itc", "loss_itm", "loss_lm", "loss")
INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "image_ids")
TOKENIZER_MAX_CAPTIONS = 500_000


def train(cfg: RunConfig) -> VisionLanguageModel:
    """Train (or resume) the run ``cfg`` describes; returns this rank's model."""
    env = init_distributed(cfg.train)
    try:
        return _train(cfg, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: RunConfig, env: "DistributedEnv") -> VisionLanguageModel:
    tc = cfg.train
    setup_logging(Path(tc.log_dir), env.rank)
    precision = choose_precision(tc.mixed_precision, env.device)
    logger.info("Run: %d process(es) on %s, precision %s%s", env.world_size, env.device, precision.name,
                ", DDP over one process (train.use_ddp)" if env.ddp and env.world_size == 1 else "")
    checkpointer = Checkpointer(tc.checkpoint_dir, tc.keep_last, env.rank, env.world_size,
                                background=tc.checkpoint_in_background)
    resume_from = find_resume_checkpoint(tc)

    # Data and tokenizer. The tokenizer is trained on the training captions at the first start, then always
    # comes back from the checkpoint.
    train_set = build_dataset(cfg.data, "train", cfg.model.vision.image_size)
    tokenizer = prepare_tokenizer(cfg, train_set, resume_from, env)
    loader = build_dataloader(train_set, cfg.data, tc.batch_size, train=True, seed=tc.seed, rank=env.rank,
                              world_size=env.world_size, tokenize=tokenizer)
    logger.info("Data: %s %s%s, %d loader worker(s) in this process (data.num_workers %s)", cfg.data.format,
                cfg.data.train_path, f" (images under {cfg.data.image_root})" if cfg.data.image_root else "",
                loader.loader.num_workers, cfg.data.num_workers)
    steps_per_epoch = count_steps_per_epoch(loader, tc.grad_accum_steps)
    total_steps = count_total_steps(tc, steps_per_epoch)

    # Model: the same seed on every rank gives the same initial weights; then each rank its own RNG stream.
    seed_everything(tc.seed)
    model = VisionLanguageModel(cfg.model, tokenizer).to(env.device)
    seed_everything(tc.seed + env.rank)
    # On a GPU only, and not for fp16: evaluation and captioning there run under bf16 autocast (fp32 on the CPU).
    if precision.dtype == torch.bfloat16 and env.device.type == "cuda":
        stored = model.vision.store_frozen_weights(precision.dtype)
        logger.info("Frozen encoder weights stored in bf16 (%d tensors), as autocast would cast them each step",
                    stored)
    logger.info(model.vision.summary.format())
    if tc.compile:
        torch._dynamo.config.optimize_ddp = tc.ddp_split_compiled_graph  # read when the wrapped model compiles
        model.compile(scope=tc.compile_scope, mode=tc.compile_mode)  # in place: names and checkpoints unchanged

    # Phase 1 setup. DDP registers only parameters that require grad when it wraps the model.
    ddp_model = wrap_model(model, env)
    optimizer = build_optimizer(model, tc, env.device)
    scheduler = build_scheduler(optimizer, tc, total_steps, steps_done=0)
    state = TrainState()
    log_phase(model, phase=1)

    if resume_from is not None:
        saved = read_train_state(resume_from)
        if saved.lora_unfrozen:  # build the phase-2 optimizer the checkpoint holds
            ddp_model, optimizer, scheduler = unfreeze_lora(model, optimizer, tc, env, total_steps, state)
        # At an epoch boundary the next epoch starts fresh: an exhausted loader's state is not restored.
        rank_pieces = per_rank_pieces(loader if saved.step_in_epoch > 0 else None)
        checkpointer.load(resume_from, ModelWeights(model), shared_pieces(optimizer, scheduler, precision),
                          rank_pieces, state)
        logger.info("Resumed from %s at epoch %d step %d", resume_from, state.epoch, state.step)

    # The loader-bound hint only where a GPU steps: on the CPU the workers and the step share the cores, and more
    # workers take them from the step (configs/demo.yaml).
    metrics = MetricsLogger(Path(tc.log_dir), env, total_steps, tc, start_step=state.step,
                            hint_when_loader_bound=env.device.type == "cuda")
    profiler = StepProfiler(tc, env)
    stop = StopSignal(env)
    last_saved_step = state.step if resume_from is not None else -1

    def save() -> None:
        nonlocal last_saved_step
        metrics.flush()  # a bad streak must not be saved over a good checkpoint
        check_finite_weights(model)
        check_replicas(model, env, state.step)
        checkpointer.save(state.step, ModelWeights(model), shared_pieces(optimizer, scheduler, precision),
                          per_rank_pieces(loader), state, cfg, tokenizer)  # logs "Saved checkpoint" when written
        last_saved_step = state.step

    model.train()
    stopping = False
    while state.epoch < tc.epochs and state.step < total_steps and not stopping:
        if state.step_in_epoch == 0:  # a fresh epoch; mid-epoch, the loader's state was restored
            loader.set_epoch(state.epoch)
        batches = iter(loader)
        epoch_over = False
        while state.step < total_steps:
            if not state.lora_unfrozen and lora_phase_due(tc, state):
                metrics.flush()  # phase 1's last log line before phase 2 compiles
                ddp_model, optimizer, scheduler = unfreeze_lora(model, optimizer, tc, env, total_steps, state)
            with metrics.waiting_for_data():
                micro_batches = next_micro_batches(batches, tc.grad_accum_steps)
            if not micro_batches:
                epoch_over = True
                break
            step_metrics = train_step(ddp_model, micro_batches, optimizer, precision, tc, env)
            scheduler.step()
            state.step += 1
            state.step_in_epoch += 1
            metrics.record(state, step_metrics, lrs=scheduler.get_last_lr())
            profiler.step_done(state.step)

            stopping = stop.requested() or (tc.stop_at_step is not None and state.step >= tc.stop_at_step)
            if steps_per_epoch is not None and state.step_in_epoch >= steps_per_epoch:
                # The last step of the epoch: saved below as an epoch-end checkpoint, so no checkpoint ever
                # holds an exhausted loader.
                drain(batches)
                epoch_over = True
                break
            if stopping or state.step % tc.save_every == 0:
                save()
            if stopping:
                break

        if epoch_over:
            metrics.flush()
            logger.info("Epoch %d done: %s", state.epoch, format_skips(loader))
            state.epoch += 1
            state.step_in_epoch = 0
            run_validation(model, cfg, env)  # evaluation hook
        if state.step != last_saved_step:
            save()
    metrics.flush()
    metrics.close()
    profiler.close(state.step)
    stop.close()
    checkpointer.wait()  # the last checkpoint is complete, and latest names it

    finished = state.step >= total_steps or state.epoch >= tc.epochs
    if stop.received:
        logger.info("Received %s: checkpoint saved at step %d; exiting", stop.received, state.step)
    elif finished:
        export_dir = Path(tc.export_dir or Path(tc.checkpoint_dir) / "export")
        if env.rank == 0:
            from .export import export_model

            export_model(model, cfg, export_dir, merge_lora=tc.merge_lora_on_export)
            logger.info("Exported the model to %s (LoRA %s)", export_dir,
                        "merged" if tc.merge_lora_on_export else "as a PEFT adapter")
        barrier()
    logger.info("Training stopped at epoch %d step %d of %d", state.epoch, state.step, total_steps)
    return model


# The phase switch


def lora_phase_due(tc: TrainConfig, state: TrainState) -> bool:
    """Phase 2 starts at the first step of epoch ``lora_warmup_epochs`` (or step ``lora_warmup_steps``)."""
    if tc.lora_warmup_steps is not None:
        return state.step >= tc.lora_warmup_steps
    return state.epoch >= tc.lora_warmup_epochs


def unfreeze_lora(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, tc: TrainConfig,
                  env: "DistributedEnv", total_steps: int,
                  state: TrainState) -> tuple[nn.Module, torch.optim.Optimizer, LambdaLR]:
    """Phase 1 -> phase 2: LoRA trains; a new DDP wrapper (the old one does not know the LoRA parameters, so
    their gradients would never be averaged); LoRA joins the optimizer at ``lora_lr``; the schedule continues."""
    model.set_lora_trainable(True)
    gc.collect()  # drop the old DDP wrapper (and its gradient hooks) before the new one registers its own
    ddp_model = wrap_model(model, env)
    if tc.lora_unfreeze_optimizer == "add_group":  # the other groups keep their AdamW moments
        optimizer.add_param_group(lora_param_group(model, tc))
    else:  # recreate: fresh AdamW over everything that trains now
        optimizer = build_optimizer(model, tc, env.device)
    scheduler = build_scheduler(optimizer, tc, total_steps, steps_done=state.step)
    state.lora_unfrozen = True
    log_phase(model, phase=2)
    return ddp_model, optimizer, scheduler


def log_phase(model: VisionLanguageModel, phase: int) -> None:
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    what = "FROZEN" if phase == 1 else "UNFROZEN"
    logger.info("Phase %d: LoRA adapters %s | Trainable params: %s", phase, what, f"{trainable:,}")


# One optimizer step


def train_step(ddp_model: nn.Module, micro_batches: list[dict[str, Any]],
               optimizer: torch.optim.Optimizer, precision: "Precision", tc: TrainConfig,
               env: "DistributedEnv") -> dict[str, Any]:
    """Forward/backward over the micro-batches, clip, step. Returns device tensors (no host sync).

    A step whose gradient norm is not finite is skipped on the device: fused AdamW leaves parameters and moments
    untouched when ``found_inf`` is set (the GradScaler sets it itself in fp16). The norm is taken after the
    all-reduce, so every rank makes the same decision.
    """
    losses = {name: torch.zeros((), device=env.device) for name in LOSS_NAMES}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # With CUDA graphs, gradients accumulated over micro-batches need buffers of their own (allocate_grads).
    # A single micro-batch's gradients can stay the backward graph's outputs: the optimizer reads them before the
    # next replay, and they are dropped after it. That saves one accumulation kernel per trainable tensor (173 a
    # step) and its launch.
    keep_grad_buffers = uses_cuda_graphs(tc) and len(micro_batches) > 1
    if keep_grad_buffers:
        allocate_grads(params)
    images = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # A new CUDA-graph generation per micro-batch: the last one's graph outputs may be overwritten now.
        torch.compiler.cudagraph_mark_step_begin()
        inputs = to_device(batch, INPUT_KEYS, env.device)
        sync = contextlib.nullcontext() if last or not isinstance(ddp_model, DDP) else ddp_model.no_sync()
        with sync:
            with precision.autocast(env.device), record_function("loravl: forward"):
                out = ddp_model(**inputs)
            loss = out["loss"] / len(micro_batches)
            with record_function("loravl: backward"):
                if precision.scaler is not None:
                    precision.scaler.scale(loss).backward()
                else:
                    loss.backward()
        for name in LOSS_NAMES:
            losses[name] += out[name].detach().float() / len(micro_batches)
        images += inputs["pixel_values"].shape[0]
    with record_function("loravl: optimizer"):
        grad_norm, bad = clip_and_step(params, optimizer, precision, tc, losses["loss"], keep_grad_buffers)
    skipped = Counter()
    for batch in micro_batches:
        skipped.update(batch["skipped"])
    return {**losses, "grad_norm": grad_norm.detach().float(), "bad": bad.float(), "images": images,
            "skipped": skipped}


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, precision: "Precision",
                  tc: TrainConfig, loss: torch.Tensor,
                  keep_grad_buffers: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients, step (skipped on the device where not finite), zero them; (gradient norm, skipped)."""
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf,
                                               foreach=True)
    if precision.scaler is not None:
        bad = ~torch.isfinite(loss)  # inf gradients are the scaler's business (it backs off)
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        bad = ~torch.isfinite(grad_norm)
        optimizer.found_inf = bad.float()  # read by fused AdamW: skip the update where set
        optimizer.step()
        del optimizer.found_inf
    optimizer.zero_grad(set_to_none=not keep_grad_buffers)
    return grad_norm, bad


def to_device(batch: dict[str, Any], keys: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's inputs on ``device``. On a GPU they are copied on a stream of their own, which the step's stream
    then waits for: the host runs ahead of the GPU, so the copy (19 MB of pixels at batch 128) overlaps the end
    of the previous step instead of running in line between two steps."""
    if device.type != "cuda":
        return {k: batch[k].to(device) for k in keys}
    step_stream, copy_stream = torch.cuda.current_stream(device), input_copy_stream(device)
    with torch.cuda.stream(copy_stream):
        inputs = {k: batch[k].to(device, non_blocking=True) for k in keys}
    step_stream.wait_stream(copy_stream)
    for tensor in inputs.values():
        tensor.record_stream(step_stream)  # their memory is not reused before the step is done with them
    return inputs


@functools.lru_cache(maxsize=None)
def input_copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def uses_cuda_graphs(tc: TrainConfig) -> bool:
    return tc.compile and tc.compile_mode in ("reduce-overhead", "max-autotune")


def allocate_grads(params: list[nn.Parameter]) -> None:
    """Give every trainable parameter a ``.grad`` of its own before the first backward.

    With CUDA graphs a backward's gradient lives in the graph's memory pool. Autograd installs the first gradient
    of a parameter without ``.grad`` by taking that tensor itself, and the next replay (the next micro-batch, or
    another graph that shares the pool) overwrites it: accumulated gradients go wrong, or the step stops with
    "accessing tensor output of CUDAGraphs that has been overwritten" (pytorch#169545, bench/cuda_graphs_check.py).
    Into an existing ``.grad`` autograd adds in place instead. Kept across steps by ``zero_grad(set_to_none=False)``.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


@record_function("loravl: next batch")
def next_micro_batches(batches: Iterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` batches for one optimizer step; [] at the end of the epoch.

    The loader draws a worker seed from the global RNG when an epoch starts; isolating it keeps the training RNG a
    function of the steps alone, which exact resume relies on.
    """
    out = []
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            out.append(batch)
            if len(out) == count:
                break
    return out


# Optimizer and schedule


def drain(batches: Iterator[dict[str, Any]]) -> None:
    """Run the epoch's iterator to its end (normally nothing is left) so the loader closes the epoch."""
    with torch.random.fork_rng(devices=[]):
        for _ in batches:
            pass


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, gates and the temperature (all < 2-D) get no weight decay."""
    return param.ndim < 2


def build_optimizer(model: VisionLanguageModel, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over what trains now: decayed matrices, undecayed vectors/scalars, and LoRA when it trains."""
    decay, no_decay = [], []
    for name, p in model.trainable_parameters():
        if "lora_" in name:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "lr": tc.lr, "initial_lr": tc.lr, "weight_decay": tc.weight_decay, "name": "decay"},
        {"params": no_decay, "lr": tc.lr, "initial_lr": tc.lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if model.vision.lora_trainable:
        groups.append(lora_param_group(model, tc))
    # fused: one kernel per step on CUDA, and it can skip a non-finite step on the device (found_inf).
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


def lora_param_group(model: VisionLanguageModel, tc: TrainConfig) -> dict[str, Any]:
    return {"params": [p for _, p in model.lora_parameters()], "lr": tc.lora_lr, "initial_lr": tc.lora_lr,
            "weight_decay": tc.weight_decay, "name": "lora"}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio``; ``step`` = optimizer steps already taken."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int,
                    steps_done: int) -> LambdaLR:
    """The schedule positioned after ``steps_done`` steps (every group has ``initial_lr``)."""
    schedule = functools.partial(lr_multiplier, warmup_steps=tc.warmup_steps, total_steps=total_steps,
                                 min_lr_ratio=tc.min_lr_ratio)
    return LambdaLR(optimizer, schedule, last_epoch=steps_done - 1)


def count_steps_per_epoch(loader: Any, grad_accum_steps: int) -> Optional[int]:
    try:
        return math.ceil(len(loader) / grad_accum_steps)
    except TypeError:
        return None  # streaming: no epoch length


def count_total_steps(tc: TrainConfig, steps_per_epoch: Optional[int]) -> int:
    if steps_per_epoch is None:
        if tc.max_steps is None:
            raise ConfigError("train.max_steps must be set for streaming data (it has no epoch length)")
        return tc.max_steps
    if steps_per_epoch == 0:
        raise ConfigError("the training set is smaller than one batch per process (train.batch_size)")
    total = steps_per_epoch * tc.epochs
    return min(total, tc.max_steps) if tc.max_steps is not None else total


# Distributed helpers


@dataclass
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # The model is wrapped in DDP: always with several processes; with one only where train.use_ddp asks
    ddp: bool = False


def init_distributed(tc: TrainConfig) -> DistributedEnv:
    """One process, or one per GPU (CPU processes with gloo) from torchrun/accelerate's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if tc.num_gpus is not None and tc.num_gpus != world_size:
        raise ConfigError(
            f"train.num_gpus is {tc.num_gpus} but {world_size} process(es) were launched (WORLD_SIZE={world_size}); "
            f"launch with torchrun --nproc_per_node={tc.num_gpus} or drop --num_gpus")
    use_cuda = torch.cuda.is_available() and not tc.cpu
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    ddp = world_size > 1 or tc.use_ddp
    if ddp and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world_size > 1:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            # DDP over one process (train.use_ddp): what each rank of a multi-GPU run executes (the gradient
            # buckets and their all-reduce, the compiled graph split at the buckets), to check or time on one
            # GPU. An in-memory store: no rendezvous address needed, also without torchrun.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device if use_cuda else None)
    return DistributedEnv(rank, local_rank, world_size, device, ddp)


def wrap_model(model: nn.Module, env: DistributedEnv) -> nn.Module:
    if not env.ddp:
        return model
    # broadcast_buffers=False: the ITC queue is identical on every rank by construction.
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               broadcast_buffers=False)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StopSignal:
    """SIGTERM/SIGINT: finish the step, save, exit 0. A second SIGINT interrupts at once.

    Ranks may receive the signal at different steps, so they agree through a CPU (gloo) all-reduce started each
    step and read one step later: no GPU sync, no waiting, and every rank stops after the same step.
    """

    def __init__(self, env: DistributedEnv):
        self.received: Optional[str] = None
        self._flag = torch.zeros(1)
        self._pending: Optional[dist.Work] = None
        self._group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        if self._group is None:
            return self.received is not None
        agreed = False
        if self._pending is not None:
            self._pending.wait()
            agreed = bool(self._flag.item() > 0)
        if agreed and self.received is None:
            self.received = "a stop signal on another rank"
        self._flag = torch.tensor([1.0 if self.received else 0.0])
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)


class StepProfiler:
    """``train.profile_dir``: ``torch.profiler`` over the ``profile_steps`` steps after step ``profile_start_step``,
    on every rank. Writes ``rank<r>_steps<a>-<b>.json`` (a Chrome trace: chrome://tracing, ui.perfetto.dev, or
    ``python bench/trace_gaps.py`` for where the GPU waits) and ``rank<r>_steps<a>-<b>_ops.txt`` (the top
    operators by device and by host time)."""

    def __init__(self, tc: TrainConfig, env: DistributedEnv):
        self.folder = Path(tc.profile_dir) if tc.profile_dir else None
        self.start_after, self.stop_after = tc.profile_start_step, tc.profile_start_step + tc.profile_steps
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


# Precision


@dataclass
class Precision:
    name: str
    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state)


def choose_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs that have it, fp16 (with a grad scaler) on older GPUs, fp32 on CPU."""
    if setting == "auto":
        if device.type == "cuda":
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            setting = "no"
    if setting == "no":
        return Precision("fp32", None, None)
    if setting == "bf16":
        return Precision("bf16", torch.bfloat16, None)
    if device.type != "cuda":
        raise ConfigError("train.mixed_precision fp16 needs a GPU")
    return Precision("fp16", torch.float16, torch.amp.GradScaler("cuda"))


# Setup helpers


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_resume_checkpoint(tc: TrainConfig) -> Optional[Path]:
    """``latest``: the newest checkpoint in ``checkpoint_dir`` (none yet: a fresh start); a path: that one."""
    if not tc.resume:
        return None
    if tc.resume == LATEST:
        if not (Path(tc.checkpoint_dir) / LATEST).is_file():
            logger.info("No checkpoint in %s yet: starting fresh", tc.checkpoint_dir)
            return None
        return resolve_checkpoint(tc.checkpoint_dir)
    try:
        return resolve_checkpoint(tc.resume)
    except FileNotFoundError as e:
        raise ConfigError(f"train.resume: {e}") from None


def training_captions(dataset: Any, limit: int) -> Iterator[str]:
    """The captions the tokenizer learns from: the records' raw captions, no image decoding."""
    count = 0
    table = getattr(dataset, "table", None)
    if table is not None:
        records = (table.record(i) for i in range(len(table)))
    else:  # streaming: read the shards in order
        source = dataset.source
        records = (r for i in range(len(source.shards)) for r in source.iter_shard(i, 0))
    for record in records:
        for caption in getattr(record, "captions", ()):
            yield caption
            count += 1
            if count >= limit:
                return


def prepare_tokenizer(cfg: RunConfig, dataset: Any, resume_from: Optional[Path],
                      env: DistributedEnv) -> CaptionTokenizer:
    """From the checkpoint on resume; else ``model.text.tokenizer``; else trained by rank 0 on the training
    captions, saved under the checkpoint dir and read by every rank (so all ranks have the same vocabulary)."""
    if resume_from is not None:
        return caption_tokenizer(resume_from / "tokenizer", cfg)
    if cfg.model.text.tokenizer:
        return caption_tokenizer(cfg.model.text.tokenizer, cfg)
    path = Path(cfg.train.checkpoint_dir) / "tokenizer"
    if env.rank == 0:
        started = time.perf_counter()
        tokenizer = train_tokenizer(training_captions(dataset, TOKENIZER_MAX_CAPTIONS), cfg.model.text.vocab_size)
        tokenizer.save_pretrained(str(path))
        logger.info("Trained a %d-token BPE tokenizer on the training captions in %.1fs, saved to %s",
                    len(tokenizer), time.perf_counter() - started, path)
    barrier()
    return caption_tokenizer(path, cfg)


def shared_pieces(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, precision: Precision) -> dict[str, Any]:
    pieces: dict[str, Any] = {"optimizer": optimizer, "scheduler": scheduler}
    if precision.scaler is not None:
        pieces["scaler"] = precision
    return pieces


def per_rank_pieces(loader: Optional[Any]) -> dict[str, Any]:
    pieces: dict[str, Any] = {"rng": RNGState()}
    if loader is not None:
        pieces["dataloader"] = loader
    return pieces


@torch.no_grad()
def check_finite_weights(model: nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights in {bad[:5]}: not saving over a good checkpoint")


def check_replicas(model: VisionLanguageModel, env: DistributedEnv, step: int) -> None:
    """Every rank must hold the same trainable weights and LoRA (frozen or not); a silent DDP desync would not
    show in the losses. Compares per-tensor checksums across ranks at every save."""
    if env.world_size == 1:
        return
    names = sorted({n for n, _ in model.trainable_parameters()} | {n for n, _ in model.lora_parameters()})
    params = dict(model.named_parameters())
    sums = torch.stack([torch.stack([params[n].double().sum(), params[n].double().pow(2).sum()]) for n in names])
    gathered = [torch.empty_like(sums) for _ in range(env.world_size)]
    dist.all_gather(gathered, sums)
    differing = sorted({names[i] for g in gathered[1:]
                        for i in (g != gathered[0]).any(dim=1).nonzero().flatten().tolist()})
    if differing:
        raise RuntimeError(f"replicas diverged at step {step}: {len(differing)} tensors differ across ranks, "
                           f"e.g. {', '.join(differing[:5])}")
    lora = sum(1 for n in names if "lora_" in n)
    logger.info("Replica check at step %d: %d trainable tensors (%d LoRA) identical on all %d ranks",
                step, len(names), lora, env.world_size)


def format_skips(loader: Any) -> str:
    skips = loader.skips
    if not skips.skipped:
        return f"{skips.seen} samples, none skipped"
    reasons = ", ".join(f"{r}: {n}" for r, n in skips.reasons.most_common())
    return f"{skips.seen} samples, {skips.skipped} skipped ({reasons})"


def run_validation(model: VisionLanguageModel, cfg: RunConfig, env: DistributedEnv) -> None:
    """Evaluation hook, at every epoch end when ``data.val_path`` is set: retrieval and caption metrics on rank 0
    (loravl.evaluate), the other ranks wait. Its RNG use is isolated so training stays reproducible."""
    if not cfg.data.val_path:
        return
    if env.rank == 0:
        from .evaluate import evaluate_model, format_metrics

        # Eager: a compiled model would recompile for evaluation's shapes and modes, and with CUDA graphs a replay
        # would overwrite the image tokens evaluation keeps across batches.
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []), \
                torch.compiler.set_stance("force_eager"):
            val_set = build_dataset(cfg.data, "val", cfg.model.vision.image_size)
            results = evaluate_model(model, val_set, cfg)
        model.train()
        logger.info("Validation: %s", format_metrics(results))
    barrier()


# Logging


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

    NAMES = (*LOSS_NAMES, "grad_norm", "bad")
    SCALARS = (*LOSS_NAMES, "grad_norm")
    READ_BACK_LAG = 2  # steps between a read-back's start and its writing
    # A hint, once a run, when this many log lines in a row waited this share of their interval or more for data:
    # an epoch's start waited for a line or two (13-19% on an H200 before the train loader ran on across epochs,
    # 2-3% since), a loader-bound run every line (23-54%).
    LOADER_BOUND_LINES, LOADER_BOUND_WAIT = 3, 0.2

    def __init__(self, log_dir: Path, env: DistributedEnv, total_steps: int, tc: TrainConfig, start_step: int,
                 hint_when_loader_bound: bool = False):
        self.env, self.total_steps, self.tc = env, total_steps, tc
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
        log_step = step % self.tc.log_every == 0 or step >= self.total_steps
        if log_step:
            now = time.perf_counter()
            self.interval_marks[step] = (now - self.last_time, self.data_wait_s, step - self.last_step)
            self.last_time, self.last_step, self.data_wait_s = now, step, 0.0
        if log_step or step % self.tc.max_bad_steps == 0:
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
        if step % self.tc.log_every == 0 or step >= self.total_steps:
            self._log_line(step, epoch, rows[-1], pending[-1][4])
        if self.bad_streak >= self.tc.max_bad_steps:
            raise FloatingPointError(f"{self.bad_streak} steps in a row had non-finite losses or gradients "
                                     f"(train.max_bad_steps={self.tc.max_bad_steps}); stopping without saving")

    def _write(self, step: int, epoch: int, phase: int, record: dict[str, float], lrs: list[float],
               skipped: bool, skip_counts: Counter) -> None:
        line = {"step": step, "epoch": epoch, "phase": phase, **{k: record[k] for k in (*LOSS_NAMES, "grad_norm")},
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
        losses = " ".join(f"{n} {v:.4f}" for n, v in zip(LOSS_NAMES, row))
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
            # TensorBoard gets each log interval's mean (its steps that were not skipped), not every step: a
            # scalar costs ~70 us of Python, and ten steps' worth took 18 ms of the host's time on the H200 while
            # the GPU waited (bench/trace_gaps.py on a train.profile_dir trace). steps.jsonl keeps every step.
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
