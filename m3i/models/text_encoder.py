"""The trainable text encoder of the image->text branch. [paper: a BERT-like transformer; size a choice]"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from m3i.text import PAD_ID, VOCAB_SIZE

__all__ = ["TextEncoder"]


class TextEncoder(nn.Module):
    """Byte tokens -> one caption embedding: a bidirectional transformer pooled at ``[CLS]``.

    Padding is masked out of attention, and columns past the longest caption of the batch
    are cut before the blocks, so short captions cost little.

    Args:
        width: Token width.
        depth: Transformer blocks.
        heads: Attention heads.
        max_len: Longest token sequence (learned positions).
        vocab_size: Token ids in ``[0, vocab_size)``; the byte tokenizer's 259 by default.
    """

    def __init__(self, width: int, depth: int, heads: int, max_len: int, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.width = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``LongTensor[N, T] -> [N, width]`` (``N`` may be 0)."""
        keep = tokens != PAD_ID  # [N, T]
        length = int(keep.sum(dim=1).max()) if tokens.shape[0] else 1
        tokens, keep = tokens[:, :length], keep[:, :length]
        x = self.token_embed(tokens) + self.pos_embed[:, :length]  # [N, T', W]
        attn_mask = keep[:, None, None, :]  # [N, 1, 1, T']: True takes part in attention
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.norm(x[:, 0])  # [N, W]
