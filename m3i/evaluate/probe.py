"""A linear probe: multinomial logistic regression on standardised frozen features."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["linear_probe"]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Train a linear classifier on frozen ``train_features`` and score ``eval_features``.

    Features are standardised with the training set's per-dimension mean and std (so one
    learning rate fits every encoder), then ``nn.Linear(D, C)`` is trained with AdamW and a
    cosine schedule on shuffled mini-batches. Deterministic for a given ``seed``. Trains on the
    device of ``train_features``; the initialisation and the order are drawn on the CPU, so
    they are the same on every device.

    Args:
        train_features: ``[N, D]``.
        train_labels: ``[N]`` in ``[0, num_classes)``.
        eval_features: ``[M, D]``.
        num_classes: ``C``.
        epochs: Passes over the training features.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Features per step.
        seed: Seed of the initialisation and the order.

    Returns:
        Logits ``[M, C]`` on the device of ``train_features``.

    Raises:
        ValueError: On empty or mismatched inputs.
    """
    if len(train_features) == 0 or len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} features and {len(train_labels)} labels; need equal, > 0")
    gen = torch.Generator().manual_seed(seed)
    device = train_features.device
    x = train_features.float()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)  # [1, D]
    x = (x - mean) / std
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(x.shape[1])
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    y = train_labels.long().to(device)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            for lo in range(0, len(x), batch_size):
                idx = order[lo : lo + batch_size]
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return head((eval_features.to(device).float() - mean) / std)
