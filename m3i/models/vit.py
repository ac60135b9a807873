"""Running a timm VisionTransformer on a subset of its patch tokens.

timm's ``forward_features`` always sees every patch; the masked (non-mixed) input of the
image branch keeps only the visible ones, so the token path is spelled out here with
timm's own modules. [sim: MAE-style encoder on visible tokens]
"""

from __future__ import annotations

import torch
from timm.models import VisionTransformer
from timm.models._manipulate import checkpoint_seq

__all__ = ["encoder_tokens", "patch_tokens", "pool_tokens", "same_image_mask"]


def same_image_mask(groups: torch.Tensor, prefix: int) -> torch.Tensor:
    """Attention mask that keeps each image of a mixed input to its own patches.

    Args:
        groups: ``[N, L]`` which image each patch belongs to (e.g. 0 for A, 1 for B).
        prefix: Prefix (class/register) tokens in front of the patches; they see and are seen by all.

    Returns:
        ``BoolTensor[N, 1, P + L, P + L]``, ``True`` where a query may attend to a key.
    """
    n, length = groups.shape
    g = torch.cat([groups.new_full((n, prefix), -1), groups], dim=1)  # [N, P+L]
    allowed = (g[:, :, None] == g[:, None, :]) | (g[:, :, None] < 0) | (g[:, None, :] < 0)
    return allowed[:, None]


def encoder_tokens(
    backbone: VisionTransformer,
    images: torch.Tensor,
    keep: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output tokens of ``backbone``, prefix (class/register) tokens first, after the final ``norm``.

    Args:
        backbone: A timm ViT (its ``norm`` is the identity when it pools with ``fc_norm``).
        images: ``[N, 3, H, W]``.
        keep: ``[N, K]`` indices of the patches to run (row-major), or ``None`` for all.
        attn_mask: ``[N, 1, P + K, P + K]`` boolean mask of allowed attention (see :func:`same_image_mask`).

    Returns:
        ``[N, P + K, D]`` (``[N, P + L, D]`` when ``keep`` is ``None``), ``P = backbone.num_prefix_tokens``.
    """
    x = backbone.patch_embed(images)  # [N, L, D]
    x = backbone._pos_embed(x)  # [N, P + L, D]
    prefix = backbone.num_prefix_tokens
    if keep is not None:
        d = x.shape[-1]
        patches = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, d))  # [N, K, D]
        x = torch.cat([x[:, :prefix], patches], dim=1)
    x = backbone.norm_pre(x)
    if attn_mask is not None:
        for blk in backbone.blocks:
            x = blk(x, attn_mask=attn_mask)
    elif backbone.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    return backbone.norm(x)


def patch_tokens(backbone: VisionTransformer, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Output patch tokens of ``backbone`` (prefix tokens run along but are dropped): ``[N, K, D]``.

    See :func:`encoder_tokens` for the arguments.
    """
    return encoder_tokens(backbone, images, keep)[:, backbone.num_prefix_tokens :]


def pool_tokens(backbone: VisionTransformer, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The global embedding by the backbone's ``global_pool``, then its ``fc_norm``.

    With every patch this equals ``backbone.forward_head(backbone.forward_features(x), pre_logits=True)``;
    ``weights`` pools a subset of the patches (one image of a mixed input).

    Args:
        backbone: The ViT whose ``global_pool`` (``avg``, ``max``, ``avgmax`` or ``token``) and ``fc_norm`` to apply.
        tokens: ``[N, P + L, D]`` output of :func:`encoder_tokens`.
        weights: ``[N, L]`` 0/1 (or bool) selection of each row's patches; ``None`` pools all.

    Returns:
        ``[N, D]``.

    Raises:
        ValueError: On ``token`` pooling of a subset, or a pooling m3i does not support.
    """
    pool = backbone.global_pool
    prefix = backbone.num_prefix_tokens
    if pool == "token":
        if weights is not None:
            raise ValueError("global_pool='token' cannot pool a subset of patches (a mixed input); use avg, max or avgmax")
        return backbone.fc_norm(tokens[:, 0])
    x = tokens[:, prefix:]  # [N, L, D]
    if weights is None:
        avg, top = x.mean(dim=1), x.amax(dim=1)
    else:
        w = weights.to(x.dtype)[..., None]  # [N, L, 1]
        avg = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        top = x.masked_fill(w == 0, float("-inf")).amax(dim=1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row without patches
    if pool == "avg":
        pooled = avg
    elif pool == "max":
        pooled = top
    elif pool == "avgmax":
        pooled = 0.5 * (avg + top)
    else:
        raise ValueError(f"global_pool={pool!r} is not supported; allowed: avg, max, avgmax, token")
    return backbone.fc_norm(pooled)
