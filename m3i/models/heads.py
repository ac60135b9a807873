"""Projector and predictor of the image->image branch. [sim]"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from m3i.models.pos_embed import position_features

__all__ = ["Projector", "Predictor"]


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Projector(nn.Module):
    """Encoder tokens -> target space: LayerNorm, linear map, optional transformer blocks.

    The leading LayerNorm stands in for the ViT's final norm, which timm moves after pooling
    (``fc_norm``) when it pools by averaging. The EMA target holds a copy. [sim: decoder_embed
    + projector blocks; LayerNorm blocks here instead of SiameseIM's BatchNorm ones, choice]

    Args:
        in_dim: Encoder width.
        dim: Output width (``model.proj_dim``).
        depth: Transformer blocks after the linear map.
        heads: Attention heads of those blocks.
    """

    def __init__(self, in_dim: int, dim: int, depth: int = 0, heads: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.linear = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)))
        self.apply(_init_linear)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L, in_dim] -> [N, L, dim]``."""
        return self.blocks(self.linear(self.norm(tokens)))


class Predictor(nn.Module):
    """Visible tokens + mask tokens at query positions -> predictions at the query positions.

    Every token gets a position in the input view's patch grid, with scale: visible tokens
    their own patch, mask tokens the target view's patches relative to the input view's
    top-left corner (scale and flip aware). Positions enter through sin-cos features and a
    linear map. [paper][sim]

    Args:
        dim: Token width (``model.proj_dim``), a multiple of 4.
        depth: Transformer blocks.
        heads: Attention heads.
    """

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_mlp = nn.Linear(2 * dim, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, dim)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, visible: torch.Tensor, visible_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Predict the target tokens at ``query_pos``.

        Args:
            visible: ``[B, n, dim]`` projected visible tokens.
            visible_pos: ``[B, n, 4]`` their positions.
            query_pos: ``[B, m, 4]`` positions to predict.

        Returns:
            ``[B, m, dim]``.
        """
        n = visible.shape[1]
        # Positions and their sin-cos features are float32 (a bf16 row index is off by a
        # fraction of a patch past 256); they meet the weights in the weights' dtype, as
        # DeepSpeed's bf16/fp16 engines run the module without autocast.
        feats = position_features(torch.cat([visible_pos.float(), query_pos.float()], dim=1), self.dim)  # [B, n+m, 2 dim]
        pos = self.pos_mlp(feats.to(self.pos_mlp.weight.dtype))  # [B, n+m, dim]
        queries = self.mask_token.expand(query_pos.shape[0], query_pos.shape[1], -1)  # [B, m, dim]
        x = torch.cat([visible, queries.to(visible.dtype)], dim=1) + pos.to(visible.dtype)  # [B, n+m, dim]
        x = self.head(self.norm(self.blocks(x)))
        return x[:, n:]
