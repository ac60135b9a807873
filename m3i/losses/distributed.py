"""The few collectives the objective needs; each is the identity when not distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

__all__ = ["is_distributed", "world_size", "all_reduce_sum", "all_gather_nograd", "all_gather_with_grad"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; no gradient flows)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [int(s) for s in out]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])


def all_gather_nograd(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` from every rank, concatenated in rank order (ranks may hold different counts)."""
    if not is_distributed():
        return t
    sizes = _sizes(t.shape[0], t.device)
    padded = _pad(t.detach(), max(sizes))
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` from every rank, concatenated in rank order, differentiable.

    The backward sums each rank's gradient into the rank that owns the rows, so when every
    rank computes the same loss over the gathered rows the averaged DDP gradient is that
    loss's exact gradient.
    """
    if not is_distributed():
        return t
    sizes = _sizes(t.shape[0], t.device)
    parts = dist_fn.all_gather(_pad(t, max(sizes)))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
