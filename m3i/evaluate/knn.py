"""Weighted kNN classification on frozen features (InstDisc / DINO style) and top-k accuracy."""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["knn_scores", "topk_accuracy"]


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class votes of the ``k`` nearest memory-bank neighbours by cosine similarity.

    Each neighbour votes for its label with weight ``exp(cos / temperature)``; the class with
    most weight wins. With fewer than ``k`` samples in the bank all of them vote.

    Args:
        train_features: Memory bank ``[N, D]``.
        train_labels: Its labels ``[N]`` in ``[0, num_classes)``.
        eval_features: Queries ``[M, D]``.
        num_classes: ``C``.
        k: Neighbours per query.
        temperature: Softness of the vote weights.
        chunk: Queries per similarity block (bounds memory at ``chunk x N``).

    Runs on the device of ``eval_features`` (the other tensors are moved there).

    Returns:
        Votes ``[M, C]`` on that device (rank them for top-k predictions).

    Raises:
        ValueError: On empty inputs, mismatched shapes, ``k < 1`` or ``temperature <= 0``.
    """
    if train_features.ndim != 2 or eval_features.ndim != 2 or train_features.shape[1] != eval_features.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D]; got {tuple(train_features.shape)} and {tuple(eval_features.shape)}")
    if len(train_features) == 0 or len(train_labels) != len(train_features):
        raise ValueError(f"memory bank of {len(train_features)} features and {len(train_labels)} labels; need equal, > 0")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k}, temperature={temperature}; allowed k >= 1, temperature > 0")
    device = eval_features.device
    bank = F.normalize(train_features.to(device).float(), dim=1)  # [N, D]
    queries = F.normalize(eval_features.float(), dim=1)  # [M, D]
    train_labels = train_labels.to(device)
    k = min(k, len(bank))
    out = torch.zeros(len(queries), num_classes, device=device)
    for lo in range(0, len(queries), chunk):
        sim = queries[lo : lo + chunk] @ bank.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()  # [m, k]
        out[lo : lo + chunk].scatter_add_(1, train_labels[top_idx], weights)
    return out


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the ``k`` highest scores, for each ``k``.

    ``k`` is capped at the number of classes (top-5 of 3 classes is always 1.0). Tied scores are
    ranked as ``torch.topk`` ranks them.

    Returns:
        ``{k: accuracy in [0, 1]}``.
    """
    if len(labels) == 0:
        raise ValueError("no labels to score")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [M, kmax]
    hit = top == labels[:, None]  # [M, kmax]
    return {k: float(hit[:, : min(k, scores.shape[1])].any(dim=1).float().mean()) for k in ks}
