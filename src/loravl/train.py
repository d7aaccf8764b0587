"""Stage-1 training: ``train(cfg)`` reads top to bottom; the phase switch and the optimizer step follow it. Processes
and DDP live in ``runtime``, logging in ``metrics``, the optimizer in ``optim``, precision in ``device``.

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
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR
from torch.profiler import record_function  # labels in train.profile.dir's traces

from .checkpoint import Checkpointer, RNGState, TrainState, find_start, read_train_state
from .config import ModelConfig, RunConfig, TextConfig, TrainConfig
from .data import build_dataloader, build_dataset
from .device import Precision, choose_precision
from .integrity import saved_world_size
from .loading import caption_tokenizer, export_model
from .losses import distill_alpha_at
from .metrics import MetricsLogger, format_skips, global_skips, loss_names, setup_logging
from .model import VisionLanguageModel
from .optim import (apply_learning_rates, build_optimizer, build_scheduler, count_steps_per_epoch, count_total_steps,
                    distill_ramp_steps, lora_param_group)
from .profiling import StepProfiler
from .resume import check_resume
from .runtime import (DistributedEnv, StopSignal, barrier, check_replicas, close_distributed, init_distributed,
                      quiet_known_warnings, seed_everything, wrap_model)
from .text import CaptionTokenizer, train_tokenizer
from .weights import ModelWeights

logger = logging.getLogger("loravl.train")

INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "image_ids")
TOKENIZER_MAX_CAPTIONS = 500_000


def train(cfg: RunConfig) -> VisionLanguageModel:
    """Train (or resume) the run ``cfg`` describes; returns this rank's model."""
    quiet_known_warnings()
    env = init_distributed(cfg.train)
    try:
        return _train(cfg, env)
    finally:
        close_distributed()


def _train(cfg: RunConfig, env: DistributedEnv) -> VisionLanguageModel:
    tc = cfg.train
    setup_logging(Path(tc.logging.dir), env.rank)
    precision = choose_precision(tc.mixed_precision, env.device)
    logger.info("Run: %d process(es) on %s, precision %s%s", env.world_size, env.device, precision.name,
                ", DDP over one process (train.use_ddp)" if env.ddp and env.world_size == 1 else "")
    checkpointer = Checkpointer(tc.checkpoint.dir, tc.checkpoint.keep_last, env.rank, env.world_size,
                                background=tc.checkpoint.in_background)
    resume_from = find_start(Path(tc.checkpoint.dir), tc.resume, tc.overwrite, env.rank)
    if resume_from is not None:  # before anything is built: a resume that would be another run stops here
        saved, saved_processes = read_train_state(resume_from), saved_world_size(resume_from)
        same_split = saved_processes == env.world_size
        changed = check_resume(resume_from, cfg, saved_processes, env.world_size, at_epoch_end=saved.step_in_epoch == 0)

    # Data and tokenizer. The tokenizer is trained on the training captions at the first start, then always
    # comes back from the checkpoint.
    train_set = build_dataset(cfg.data, "train", cfg.model.vision.image_size)
    # Read now, so a wrong data.val_path fails at the start, not after the first epoch's training.
    val_set = build_dataset(cfg.data, "val", cfg.model.vision.image_size) if cfg.data.val_path and env.rank == 0 \
        else None
    tokenizer = prepare_tokenizer(cfg.model.text, train_set, Path(tc.checkpoint.dir), resume_from, env)
    loader = build_dataloader(train_set, cfg.data, tc.batch_size, train=True, seed=tc.seed, rank=env.rank,
                              world_size=env.world_size, tokenize=tokenizer)
    logger.info("Data: %s %s%s, %d loader worker(s) in this process (data.num_workers %s)", cfg.data.format,
                cfg.data.train_path, f" (images under {cfg.data.image_root})" if cfg.data.image_root else "",
                loader.loader.num_workers, cfg.data.num_workers)
    steps_per_epoch = count_steps_per_epoch(loader, tc.grad_accum_steps)
    total_steps = count_total_steps(tc, steps_per_epoch)
    alpha_ramp_steps = distill_ramp_steps(cfg.model.loss, steps_per_epoch)
    if not lora_phase_due(tc, TrainState(epoch=tc.epochs - 1, step=total_steps - 1)):
        logger.warning("LoRA never trains in this run: phase 2 would start after its last step (train.epochs %d, "
                       "train.lora_warmup_epochs %d, train.lora_warmup_steps %s, %d steps)", tc.epochs,
                       tc.lora_warmup_epochs, tc.lora_warmup_steps, total_steps)

    model = build_training_model(cfg.model, tc, tokenizer, env, precision)

    # Phase 1 setup. DDP registers only parameters that require grad when it wraps the model.
    ddp_model = wrap_model(model, env)
    optimizer = build_optimizer(model, tc, env.device)
    scheduler = build_scheduler(optimizer, tc, total_steps, steps_done=0)
    state = TrainState()
    if resume_from is None:  # a phase line is written only when it is true: once at a fresh start, once at the switch
        log_phase(model, phase=1)

    if resume_from is not None:
        if saved.lora_unfrozen:  # build the phase-2 optimizer the checkpoint holds
            ddp_model, optimizer, scheduler = unfreeze_lora(model, optimizer, tc, env, total_steps, state,
                                                            announce=False)
        # At an epoch boundary the next epoch starts fresh: an exhausted loader's state is not restored. With
        # another number of processes (only there) each rank keeps its own fresh RNG stream.
        rank_pieces = per_rank_pieces(loader if saved.step_in_epoch > 0 else None) if same_split else {}
        checkpointer.load(resume_from, ModelWeights(model), shared_pieces(optimizer, scheduler, precision),
                          rank_pieces, state, verified=True)
        if {"train.lr", "train.lora_lr"} & set(changed):  # the restored groups carry the old rates
            scheduler = apply_learning_rates(optimizer, tc, total_steps, state.step)
        trainable = sum(p.numel() for _, p in model.trainable_parameters())
        logger.info("Resumed from %s at epoch %d step %d, in phase %d (LoRA %s) | Trainable params: %s",
                    resume_from, state.epoch, state.step, state.phase, "trains" if state.lora_unfrozen else "frozen",
                    f"{trainable:,}")

    # The loader-bound hint only where a GPU steps: on the CPU the workers and the step share the cores, and more
    # workers take them from the step (configs/demo.yaml).
    metrics = MetricsLogger(tc.logging, tc.max_bad_steps, env, total_steps, start_step=state.step,
                            hint_when_loader_bound=env.device.type == "cuda",
                            losses=loss_names(cfg.model))
    profiler = StepProfiler(tc.profile, env)
    stop = StopSignal(env)
    last_saved_step = state.step if resume_from is not None else -1

    def save() -> None:
        nonlocal last_saved_step
        metrics.flush()  # a bad streak must not be saved over a good checkpoint
        check_replicas(model, env, state.step)
        checkpointer.save(state.step, ModelWeights(model), shared_pieces(optimizer, scheduler, precision),
                          per_rank_pieces(loader), state, cfg.to_dict(), tokenizer)  # logs when written
        last_saved_step = state.step

    model.train()
    stopping, stop_started = False, time.perf_counter()
    distill_alpha = None  # what model.distill_alpha holds, once the loop has set it
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
            alpha = distill_alpha_at(state.step, cfg.model.loss.distill_alpha, alpha_ramp_steps)
            if alpha != distill_alpha:  # changes only while it ramps
                model.distill_alpha.fill_(alpha)
                distill_alpha = alpha
            step_metrics = train_step(ddp_model, micro_batches, optimizer, precision, tc, env)
            lrs = scheduler.get_last_lr()  # the rates this step used; after scheduler.step() the next step's
            scheduler.step()
            state.step += 1
            state.step_in_epoch += 1
            metrics.record(state, step_metrics, lrs=lrs)
            profiler.step_done(state.step)

            stopping = stop.requested() or (tc.stop_at_step is not None and state.step >= tc.stop_at_step)
            if stopping:
                stop_started = time.perf_counter()
            if steps_per_epoch is not None and state.step_in_epoch >= steps_per_epoch:
                # The last step of the epoch: saved below as an epoch-end checkpoint, so no checkpoint ever
                # holds an exhausted loader.
                drain(batches)
                epoch_over = True
                break
            if stopping or state.step % tc.checkpoint.save_every == 0:
                save()
            if stopping:
                break

        if epoch_over:
            metrics.flush()
            logger.info("Epoch %d done: %s", state.epoch, format_skips(global_skips(loader.skips, env)))
            state.epoch += 1
            state.step_in_epoch = 0
            run_validation(model, val_set, cfg, env)  # evaluation hook
        if state.step != last_saved_step:
            save()
    metrics.flush()
    metrics.close()
    profiler.close(state.step)
    stop.close()
    checkpointer.wait()  # the last checkpoint is complete, and latest names it

    finished = state.step >= total_steps or state.epoch >= tc.epochs
    if stop.received:  # preemption notice is short on clusters: say how long the save took
        logger.info("Received %s: checkpoint saved at step %d in %.1fs; exiting", stop.received, state.step,
                    time.perf_counter() - stop_started)
    elif finished:
        export_dir = Path(tc.checkpoint.export_dir or Path(tc.checkpoint.dir) / "export")
        if env.rank == 0:
            export_model(model, cfg, export_dir, merge_lora=tc.checkpoint.merge_lora_on_export)
            logger.info("Exported the model to %s (LoRA %s)", export_dir,
                        "merged" if tc.checkpoint.merge_lora_on_export else "as a PEFT adapter")
        barrier()
    logger.info("Training stopped at epoch %d step %d of %d", state.epoch, state.step, total_steps)
    return model


def build_training_model(model_cfg: ModelConfig, tc: TrainConfig, tokenizer: CaptionTokenizer, env: DistributedEnv,
                         precision: Precision) -> VisionLanguageModel:
    """The model as the trainer trains it (also what bench/throughput.py times): the same seed on every rank gives
    the same initial weights, then each rank its own RNG stream; frozen weights stored in the autocast dtype;
    compiled in place where ``train.compile`` asks."""
    seed_everything(tc.seed)
    model = VisionLanguageModel(model_cfg, tokenizer).to(env.device)
    model.momentum_in_forward = False  # train_step takes the momentum step once per optimizer step
    seed_everything(tc.seed + env.rank)
    # On a GPU only, and not for fp16: evaluation and captioning there run under bf16 autocast (fp32 on the CPU).
    if precision.dtype == torch.bfloat16 and env.device.type == "cuda":
        stored = model.vision.store_frozen_weights(precision.dtype)
        logger.info("Frozen encoder weights stored in bf16 (%d tensors), as autocast would cast them each step",
                    stored)
    logger.info(model.vision.summary.format())
    if tc.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    if tc.compile.enabled:
        torch._dynamo.config.optimize_ddp = tc.compile.ddp_split_graph  # read when the wrapped model compiles
        model.compile(scope=tc.compile.scope, mode=tc.compile.mode)  # in place: names and checkpoints unchanged
    return model


# The phase switch


def lora_phase_due(tc: TrainConfig, state: TrainState) -> bool:
    """Phase 2 starts at the first step of epoch ``lora_warmup_epochs`` (or step ``lora_warmup_steps``)."""
    if tc.lora_warmup_steps is not None:
        return state.step >= tc.lora_warmup_steps
    return state.epoch >= tc.lora_warmup_epochs


def unfreeze_lora(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, tc: TrainConfig,
                  env: DistributedEnv, total_steps: int, state: TrainState,
                  announce: bool = True) -> tuple[nn.Module, torch.optim.Optimizer, LambdaLR]:
    """Phase 1 -> phase 2: LoRA trains; a new DDP wrapper (the old one does not know the LoRA parameters, so
    their gradients would never be averaged); LoRA joins the optimizer at ``lora_lr``; the schedule continues.
    ``announce``: log the switch (not when a resume rebuilds the phase-2 optimizer its checkpoint holds)."""
    model.set_lora_trainable(True)
    gc.collect()  # drop the old DDP wrapper (and its gradient hooks) before the new one registers its own
    ddp_model = wrap_model(model, env)
    if tc.lora_unfreeze_optimizer == "add_group":  # the other groups keep their AdamW moments
        optimizer.add_param_group(lora_param_group(model, tc))
    else:  # recreate: fresh AdamW over everything that trains now
        optimizer = build_optimizer(model, tc, env.device)
    scheduler = build_scheduler(optimizer, tc, total_steps, steps_done=state.step)
    state.lora_unfrozen = True
    if announce:
        log_phase(model, phase=2)
    return ddp_model, optimizer, scheduler


def log_phase(model: VisionLanguageModel, phase: int) -> None:
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    what = "FROZEN" if phase == 1 else "UNFROZEN"
    logger.info("Phase %d: LoRA adapters %s | Trainable params: %s", phase, what, f"{trainable:,}")


# One optimizer step


def train_step(ddp_model: nn.Module, micro_batches: list[dict[str, Any]],
               optimizer: torch.optim.Optimizer, precision: Precision, tc: TrainConfig,
               env: DistributedEnv) -> dict[str, Any]:
    """Forward/backward over the micro-batches, clip, step. Returns device tensors (no host sync).

    A step whose gradient norm is not finite is skipped on the device: fused AdamW leaves parameters and moments
    untouched when ``found_inf`` is set (the GradScaler sets it itself in fp16). The norm is taken after the
    all-reduce, so every rank makes the same decision.
    """
    model = ddp_model.module if isinstance(ddp_model, DDP) else ddp_model
    names = loss_names(model.cfg)
    losses = {name: torch.zeros((), device=env.device) for name in names}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # With CUDA graphs, gradients accumulated over micro-batches need buffers of their own (allocate_grads).
    # A single micro-batch's gradients can stay the backward graph's outputs: the optimizer reads them before the
    # next replay, and they are dropped after it. That saves one accumulation kernel per trainable tensor (173 a
    # step) and its launch.
    keep_grad_buffers = tc.compile.cuda_graphs and len(micro_batches) > 1
    if keep_grad_buffers:
        allocate_grads(params)
    images = 0
    if not model.momentum_in_forward:  # once per optimizer step, before the forward reads the momentum copies
        model.momentum_update()
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
        for name in names:
            losses[name] += out[name].detach().float() / len(micro_batches)
        images += inputs["pixel_values"].shape[0]
    with record_function("loravl: optimizer"):
        grad_norm, bad = clip_and_step(params, optimizer, precision, tc, losses["loss"], keep_grad_buffers)
        model.clamp_parameters()
    skipped = Counter()
    for batch in micro_batches:
        skipped.update(batch["skipped"])
    return {**losses, "grad_norm": grad_norm.detach().float(), "bad": bad.float(), "images": images,
            "skipped": skipped}


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, precision: Precision,
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


def allocate_grads(params: list[nn.Parameter]) -> None:
    """Give every trainable parameter a ``.grad`` of its own before the first backward.

    With CUDA graphs a backward's gradient lives in the graph's memory pool. Autograd installs the first gradient
    of a parameter without ``.grad`` by taking that tensor itself, and the next replay (the next micro-batch, or
    another graph that shares the pool) overwrites it: accumulated gradients go wrong, or the step stops with
    "accessing tensor output of CUDAGraphs that has been overwritten" (pytorch#169545).
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


def drain(batches: Iterator[dict[str, Any]]) -> None:
    """Run the epoch's iterator to its end (normally nothing is left) so the loader closes the epoch."""
    with torch.random.fork_rng(devices=[]):
        for _ in batches:
            pass


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


def prepare_tokenizer(text: TextConfig, dataset: Any, checkpoint_dir: Path, resume_from: Optional[Path],
                      env: DistributedEnv) -> CaptionTokenizer:
    """From the checkpoint on resume; else ``model.text.tokenizer``; else trained by rank 0 on the training
    captions, saved under the checkpoint dir and read by every rank (so all ranks have the same vocabulary)."""
    if resume_from is not None:
        return caption_tokenizer(resume_from / "tokenizer", text)
    if text.tokenizer:
        return caption_tokenizer(text.tokenizer, text)
    path = checkpoint_dir / "tokenizer"
    if env.rank == 0:
        started = time.perf_counter()
        tokenizer = train_tokenizer(training_captions(dataset, TOKENIZER_MAX_CAPTIONS), text.vocab_size)
        tokenizer.save_pretrained(str(path))
        logger.info("Trained a %d-token BPE tokenizer on the training captions in %.1fs, saved to %s",
                    len(tokenizer), time.perf_counter() - started, path)
    barrier()
    return caption_tokenizer(path, text)


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


def run_validation(model: VisionLanguageModel, val_set: Any, cfg: RunConfig, env: DistributedEnv) -> None:
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
            results = evaluate_model(model, val_set, cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        model.train()
        logger.info("Validation: %s", format_metrics(results))
    barrier()


