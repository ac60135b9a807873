"""image->category: softmax cross-entropy over learnable class embeddings, labelled samples only. [paper]"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["masked_cross_entropy"]


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the samples that have a label (``labels >= 0``).

    Unlabelled rows still enter the graph with weight 0, so every rank's head gets a
    gradient (zeros) even on a batch without labels, and the loss is 0, never NaN.

    Args:
        logits: ``[N, K]``.
        labels: ``[N]``, ``-1`` when unlabelled.
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`. [choice]

    Returns:
        ``(loss, count, correct)``: scalar loss, labelled samples, of them correctly ranked first.

    Raises:
        ValueError: If a label is ``>= K``.
    """
    num_classes = logits.shape[-1]
    valid = labels >= 0  # [N]
    if bool((labels >= num_classes).any()):
        bad = int(labels.max())
        raise ValueError(
            f"label {bad} is out of range for {num_classes} classes; allowed -1 (none) or 0..{num_classes - 1}"
        )
    safe = labels.clamp_min(0)
    ce = F.cross_entropy(logits.float(), safe, reduction="none", label_smoothing=label_smoothing)  # [N]
    w = valid.to(ce.dtype)
    count = w.sum()
    loss = (ce * w).sum() / count.clamp_min(1.0)
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == safe) & valid).sum().to(ce.dtype)
    return loss, count.detach(), correct
