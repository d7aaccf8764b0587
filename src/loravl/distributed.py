"""The few collective operations the losses need; each is the identity in a single process.

Batches may differ in size across ranks (the loader drops undecodable samples), so gathers pad to the largest
batch and strip the padding again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# all_gather_single_autograd replaces all_gather_tensor_autograd (deprecated, warning at every call) where it exists.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


_cpu_group = None


def _host_group():
    """A gloo group for exchanging host-side integers: no GPU synchronisation (the default group may be NCCL)."""
    global _cpu_group
    if dist.get_backend() == "gloo":
        return None
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")  # every rank reaches this in the same forward
    return _cpu_group


def _batch_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size, group=_host_group())
    return [int(s) for s in sizes]


def _pad_to(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    pad = t.new_zeros((n - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def gather_batch_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's batch size, in rank order."""
    return _batch_sizes(n, device) if is_distributed() else [n]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows of ``t``, in rank order: gathered padded to the largest batch, the padding stripped.

    Functional collectives: ``torch.compile`` traces them into its graph (``torch.distributed.nn``'s gather breaks
    the graph), and their backward sends each rank the gradient of its own rows, summed over the ranks' losses.
    """
    n = max(sizes)
    gathered = _all_gather_autograd(_pad_to(t.contiguous(), n), gather_dim=0, group=dist.group.WORLD)
    if isinstance(gathered, funcol.AsyncCollectiveTensor):  # eager: wait here rather than at the first use
        gathered = gathered.wait()
    if all(s == n for s in sizes):
        return gathered
    return torch.cat([gathered[i * n: i * n + s] for i, s in enumerate(sizes)], dim=0)


@torch.no_grad()
def gather_no_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0 (rank order), without autograd."""
    if not is_distributed():
        return t
    return _gather_padded(t, sizes or _batch_sizes(t.shape[0], t.device))


def gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """As ``gather_no_grad``, but gradients flow back to the rank that produced each row."""
    if not is_distributed():
        return t
    return _gather_padded(t, sizes or _batch_sizes(t.shape[0], t.device))


def rank_offset(sizes: list[int]) -> int:
    """Where this rank's rows start in a gathered tensor."""
    return sum(sizes[: rank()])
