"""The trainer's processes: process group and device, DDP wrapping, stop signals, replica checks, seeding. Model code
stays single-device; only this module, the trainer and the ITC/ITM gathers (loravl.distributed) know about ranks."""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import ConfigError, TrainConfig
from .model import VisionLanguageModel

logger = logging.getLogger("loravl.train")


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
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        stop_with_launcher()
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


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistributedEnv) -> nn.Module:
    if not env.ddp:
        return model
    # broadcast_buffers=False: the ITC queue is identical on every rank by construction.
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               broadcast_buffers=False)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def quiet_known_warnings() -> None:
    """Deprecation notes every run would print that are not ours to act on, filtered by their own words."""
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)  # torchdata's own
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # PEFT's call into HF
    # Ours, but the replacement it names syncs buffers when DDP wraps the model, which the warning itself says to
    # avoid where buffers must not be synced then (the ITC queue is identical on every rank by construction).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


def stop_with_launcher() -> None:
    """Under a launcher (torchrun starts each rank in a session of its own), a rank whose launcher dies gets SIGTERM,
    so it saves and stops like any stopped run instead of training on as an orphan or hanging in a collective."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
