"""image->image: UniGrad regression to layer-normalised EMA dense targets. [sim]

    L = ( mean ||p - t||^2  +  w * mean p^T C p ) / D,    C = E[t t^T]

The first term pulls each prediction to its target (Gaussian posterior); the second pushes
predictions away from the directions the targets share, which keeps the representation
from collapsing. ``C`` is the second moment of all targets on all ranks: per-rank sums and
counts are all-reduced, so it equals the single-process value on the concatenated batch.
"""

from __future__ import annotations

import torch

from m3i.losses.distributed import all_reduce_sum

__all__ = ["target_covariance", "unigrad_loss", "feature_std"]


@torch.no_grad()
def target_covariance(target: torch.Tensor) -> torch.Tensor:
    """``C = E[t t^T]`` over the rows of ``target`` on every rank: ``[M, D] -> [D, D]`` (float32)."""
    with torch.autocast(device_type=target.device.type, enabled=False):  # a bf16 C would lose the 0.02 term
        t = target.float()
        total = all_reduce_sum(t.T @ t)  # [D, D]
    count = all_reduce_sum(torch.full((), float(t.shape[0]), device=t.device))  # a fill, not a host-to-device copy
    return total / count.clamp_min(1.0)


def unigrad_loss(pred: torch.Tensor, target: torch.Tensor, neg_weight: float = 0.02) -> torch.Tensor:
    """The UniGrad loss of SiameseIM, computed in float32.

    Args:
        pred: ``[M, D]`` predicted tokens.
        target: ``[M, D]`` targets (layer-normalised, no gradient).
        neg_weight: Weight of the ``p^T C p`` term. [sim: 0.02]

    Returns:
        Scalar loss; 0 (still attached to ``pred``) when ``M == 0``.
    """
    dim = pred.shape[-1]
    cov = target_covariance(target)  # [D, D]
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p, t = pred.float(), target.float().detach()
        if p.shape[0] == 0:
            return p.sum() * 0.0
        pos = (p - t).pow(2).sum(dim=-1).mean()
        neg = ((p @ cov) * p).sum(dim=-1).mean()
        return (pos + neg_weight * neg) / dim


@torch.no_grad()
def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: per-dimension std over rows, averaged over dimensions.

    For layer-normalised features (unit variance over dimensions per row) it is near 1 when
    rows differ and goes to 0 when every row is the same vector.
    """
    f = features.float().reshape(-1, features.shape[-1])
    if f.shape[0] < 2:
        return f.new_zeros(())
    return f.std(dim=0).mean()
