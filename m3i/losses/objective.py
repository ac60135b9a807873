"""The M3I objective: a weighted sum of the per-branch losses. [paper]

    loss = w_img * L_img + w_cls * L_cls + w_txt * L_txt

Each branch enters only when its switch is on (``objective.use_*``), so any single branch,
any pair, or all three can be trained from one config.
"""

from __future__ import annotations

import torch

from m3i.config import ObjectiveConfig

__all__ = ["BRANCHES", "combine"]

BRANCHES = ("img", "cls", "txt")
"""Branch names: image->image, image->category, image->text."""


def combine(parts: dict[str, torch.Tensor], cfg: ObjectiveConfig) -> torch.Tensor:
    """The total loss from ``parts["loss_img"|"loss_cls"|"loss_txt"]`` with the config's weights and switches.

    Args:
        parts: Per-branch losses; a branch that is off may be missing.
        cfg: The objective section.

    Returns:
        Scalar total loss.

    Raises:
        KeyError: If a branch that is on has no loss in ``parts``.
    """
    total = None
    for name in BRANCHES:
        if not getattr(cfg, f"use_{name}"):
            continue
        term = getattr(cfg, f"w_{name}") * parts[f"loss_{name}"]
        total = term if total is None else total + term
    assert total is not None, "ObjectiveConfig guarantees one branch is on"
    return total
