"""image->text: symmetric InfoNCE over the (global) batch of captioned samples. [paper; CLIP form a choice]"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from m3i.losses.distributed import all_gather_nograd, all_gather_with_grad

__all__ = ["clip_loss"]


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between image and text embeddings of the captioned samples of all ranks.

    Embeddings are gathered (with gradient) from every rank and every rank computes the same
    loss over the whole global batch, so the value equals one process on the concatenated
    batch. Rows where ``valid`` is false (no caption) take no part. With no captioned sample
    anywhere the loss is 0 (still attached to the inputs); with one it is 0 as well.

    Args:
        image: ``[N, E]`` image embeddings (normalised here).
        text: ``[N, E]`` text embeddings, any value where ``valid`` is false.
        valid: ``[N]`` bool, the samples with a caption.
        logit_scale: Scalar, ``log(1 / temperature)`` (already clamped by the caller).

    Returns:
        ``(loss, count)``: scalar loss and the captioned samples of the global batch.
    """
    # In float32 even under autocast: bf16 logits blur a softmax over the whole batch.
    with torch.autocast(device_type=image.device.type, enabled=False):
        image = F.normalize(image.float(), dim=-1)
        text = F.normalize(text.float(), dim=-1)
        image_all = all_gather_with_grad(image)  # [N_all, E]
        text_all = all_gather_with_grad(text)  # [N_all, E]
        keep = all_gather_nograd(valid.to(torch.uint8)).bool()  # [N_all]
        count = keep.sum().to(image.dtype)
        if int(count) == 0:
            return (image_all.sum() + text_all.sum()) * 0.0 + logit_scale * 0.0, count
        img, txt = image_all[keep], text_all[keep]  # [n, E]
        logits = logit_scale.exp().float() * img @ txt.T  # [n, n]
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, count
