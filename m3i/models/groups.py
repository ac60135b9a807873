"""How the model's parameters split into AdamW groups, and the names in each group.

    groups = param_groups(model, cfg.train.weight_decay)      # what the training engine's AdamW gets
    names = optimizer_group_names(cfg, num_classes)()         # [[decayed names], [undecayed names]]

Readers of a ZeRO-0 mixed-precision checkpoint need the names: its float32 master copies are
stored per optimizer group, in group order, without names (:class:`m3i.artifacts.zero.BackboneReader`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from m3i.config import Config

__all__ = ["optimizer_group_names", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; norms, biases, tokens and positions undecayed."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def optimizer_group_names(cfg: Config, num_classes: int) -> Callable[[], list[list[str]]]:
    """Parameter names of each optimizer group as training built them (ZeRO-0 mixed-precision checkpoints).

    Returns a callable, so the model is only rebuilt (on the meta device: no memory, no init
    cost) when a checkpoint turns out to need it.

    Args:
        cfg: The run's config (from the checkpoint).
        num_classes: The run's class count (the checkpoint's ``num_classes``).
    """

    def names() -> list[list[str]]:
        from m3i.models import build_model

        with torch.device("meta"):
            model = build_model(cfg, num_classes=num_classes)
        by_id = {id(p): n for n, p in model.named_parameters()}
        return [[by_id[id(p)] for p in g["params"]] for g in param_groups(model, cfg.train.weight_decay)]

    return names
