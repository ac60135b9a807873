"""Running a timm VisionTransformer on a subset of its patch tokens.

timm's ``forward_features`` always sees every patch; the masked (non-mixed) input of the
image branch keeps only the visible ones, so the token path is spelled out here with
timm's own modules. [sim: MAE-style encoder on visible tokens]
"""

from __future__ import annotations

import torch
from timm.models import VisionTransformer
from timm.models._manipulate import checkpoint_seq

__all__ = ["patch_tokens", "pool_tokens"]


def patch_tokens(backbone: VisionTransformer, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Output patch tokens of ``backbone`` (prefix tokens run along but are dropped).

    Args:
        backbone: A timm ViT built with ``global_pool='avg'`` (its ``norm`` is then the identity
            and ``fc_norm`` follows pooling).
        images: ``[N, 3, H, W]``.
        keep: ``[N, K]`` indices of the patches to run (row-major), or ``None`` for all.

    Returns:
        ``[N, K, D]`` (``[N, L, D]`` when ``keep`` is ``None``).
    """
    x = backbone.patch_embed(images)  # [N, L, D]
    x = backbone._pos_embed(x)  # [N, P + L, D]
    prefix = backbone.num_prefix_tokens
    if keep is not None:
        d = x.shape[-1]
        patches = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, d))  # [N, K, D]
        x = torch.cat([x[:, :prefix], patches], dim=1)
    x = backbone.norm_pre(x)
    if backbone.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    x = backbone.norm(x)
    return x[:, prefix:]


def pool_tokens(backbone: VisionTransformer, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The global embedding: mean of patch tokens (optionally of a subset), then timm's ``fc_norm``.

    With all tokens this equals ``backbone.forward_head(backbone.forward_features(x), pre_logits=True)``.

    Args:
        backbone: The ViT whose ``fc_norm`` to apply.
        tokens: ``[N, L, D]`` patch tokens.
        weights: ``[N, L]`` 0/1 (or bool) selection of the tokens of each row; ``None`` averages all.

    Returns:
        ``[N, D]``.
    """
    if weights is None:
        pooled = tokens.mean(dim=1)
    else:
        w = weights.to(tokens.dtype)[..., None]  # [N, L, 1]
        pooled = (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return backbone.fc_norm(pooled)
