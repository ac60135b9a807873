"""Patch positions of a view inside the input view, and their sin-cos features.

A position is ``(y, x, log sy, log sx)``: the patch centre in units of the input view's
(v1's) patches, with integer values at v1's own patch centres, and the log scale of the
patch relative to a v1 patch. [sim: ``get_2d_sincos_pos_embed_relative``]
"""

from __future__ import annotations

import torch

__all__ = ["view_positions", "grid_positions", "position_features"]


def view_positions(geom: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Positions of every patch of v2 in v1's patch grid.

    Args:
        geom: ``[B, 5]`` ``(oy, ox, sy, sx, flip)``: v2-normalised -> v1-normalised coordinates
            (see :mod:`m3i.transforms.geometry`).
        grid: Patch grid ``(rows, cols)`` of both views.

    Returns:
        ``[B, L, 4]`` ``(y, x, log sy, log sx)`` per v2 patch, row-major as ViT patch tokens.
    """
    rows, cols = grid
    geom = geom.float()
    oy, ox, sy, sx, flip = (g[:, None] for g in geom.unbind(-1))  # each [B, 1]
    v = ((torch.arange(rows, device=geom.device) + 0.5) / rows).repeat_interleave(cols)[None]  # [1, L]
    u = ((torch.arange(cols, device=geom.device) + 0.5) / cols).repeat(rows)[None]  # [1, L]
    y = (oy + sy * v) * rows - 0.5  # [B, L]
    x = (ox + (1 - 2 * flip) * sx * u) * cols - 0.5  # [B, L]
    log_sy = torch.log(sy).expand_as(y)
    log_sx = torch.log(sx).expand_as(x)
    return torch.stack([y, x, log_sy, log_sx], dim=-1)  # [B, L, 4]


def grid_positions(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``[L, 4]`` positions of v1's own patches: ``(row, col, 0, 0)``."""
    identity = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]], device=device)
    return view_positions(identity, grid)[0]


def position_features(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos features of positions: ``[..., 4] -> [..., 2 * dim]`` (``dim`` a multiple of 4).

    Each of y, x, 10 log sy, 10 log sx gets ``dim / 4`` frequencies, as sine and cosine. [sim]
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=pos.device, dtype=torch.float32) / quarter)  # [dim/4]
    pos = pos.float()
    scaled = torch.cat([pos[..., :2], pos[..., 2:] * 10.0], dim=-1)  # [..., 4]; no constant tensor to copy to the device
    angles = scaled[..., None] * omega  # [..., 4, dim/4]
    feats = torch.stack([angles.sin(), angles.cos()], dim=-2)  # [..., 4, 2, dim/4]
    return feats.flatten(-3)  # [..., 2 * dim]
