"""The trainable text encoder of the image->text branch: ``tokens [N, T] -> [N, width]``.

    enc = build_text_encoder(cfg.model)     # OpenClipTextEncoder or TextEncoder
    feats = enc(build_tokenizer(cfg.model).encode_batch(captions))   # [N, model.text_width]

[paper: a 12-layer BERT-Base-sized transformer; choice: open_clip's CLIP text transformer, or
m3i's byte encoder for tiny demo models]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from m3i.config.model import TEXT_ENCODERS
from m3i.text import CLIP_VOCAB_SIZE, PAD_ID, VOCAB_SIZE

if TYPE_CHECKING:
    from m3i.config import ModelConfig

__all__ = ["OpenClipTextEncoder", "TextEncoder", "build_text_encoder"]


def build_text_encoder(model_cfg: ModelConfig) -> nn.Module:
    """The text tower of ``model_cfg.text_encoder``, freshly initialised (no weights downloaded).

    Args:
        model_cfg: The ``model`` config section (``text_encoder``, ``text_width``, ``text_depth``,
            ``text_heads``, ``text_max_len``).

    Returns:
        A module ``LongTensor[N, T] -> [N, text_width]`` for the tokens of
        :func:`m3i.text.build_tokenizer` of the same config (``T <= text_max_len``, ``N`` may be 0).

    Raises:
        ValueError: On an unknown ``text_encoder``.
    """
    m = model_cfg
    if m.text_encoder == "open_clip":
        return OpenClipTextEncoder(m.text_width, m.text_depth, m.text_heads, m.text_max_len)
    if m.text_encoder == "byte":
        return TextEncoder(m.text_width, m.text_depth, m.text_heads, m.text_max_len)
    raise ValueError(f"model.text_encoder={m.text_encoder!r} is not allowed; choose one of {list(TEXT_ENCODERS)}")


class OpenClipTextEncoder(nn.Module):
    """CLIP BPE tokens -> one caption embedding: open_clip's ``TextTransformer``, pooled at ``<end>``.

    The tower is CLIP's as open_clip builds it: causal attention, final LayerNorm, the output at the
    ``<end>`` token (the highest id, so ``argmax`` finds it). It has no projection of its own
    (``output_dim=None``): the model's ``text_proj`` maps ``width`` into the shared space.

    Padding: a token attends only to those before it, so the pooled ``<end>`` output never sees the
    padding after it and pad id 0 (also the BPE token ``!``) needs no mask. The causal mask is a
    fixed ``[max_len, max_len]`` buffer, so shorter inputs are right-padded to ``max_len`` and the
    tower runs on all ``max_len`` positions, as CLIP trains.

    Args:
        width: Token width.
        depth: Transformer blocks.
        heads: Attention heads.
        max_len: Context length (learned positions); trained from scratch, so any length works.
        vocab_size: Token ids in ``[0, vocab_size)``; the CLIP BPE vocabulary's 49408 by default.
    """

    def __init__(self, width: int, depth: int, heads: int, max_len: int, vocab_size: int = CLIP_VOCAB_SIZE) -> None:
        super().__init__()
        # Imported here: ``import open_clip`` takes seconds and byte-encoder runs never need it.
        from open_clip.transformer import TextTransformer

        self.width = width
        self.max_len = max_len
        self.tower = TextTransformer(
            context_length=max_len,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=depth,
            output_dim=None,
            pool_type="argmax",
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``LongTensor[N, T] -> [N, width]`` with ``T <= max_len`` (``N`` may be 0).

        Raises:
            ValueError: If ``T`` is above ``max_len``.
        """
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"tokens have {t} columns; this text encoder takes at most max_len={self.max_len}")
        if t < self.max_len:
            tokens = F.pad(tokens, (0, self.max_len - t), value=0)  # [N, max_len]: after <end>, unseen by it
        return self.tower(tokens)  # [N, W]


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
