"""A byte-level tokenizer: any Unicode text, no vocabulary file, nothing to download.

    tok = ByteTokenizer(max_len=64)
    ids = tok.encode("a red circle in the centre")   # LongTensor[64]: [CLS] bytes... [EOS] [PAD]...

Text is NFC-normalised and UTF-8 encoded; every byte is a token (offset past three
specials), so the vocabulary is fixed at 259 and no text is ever out of vocabulary.
Truncation cuts at a character boundary so a caption never ends in half a character.
[choice: the paper's text encoder is BERT-Base with its WordPiece vocabulary, which
would need a download; bytes keep the run offline and language-agnostic.]
"""

from __future__ import annotations

import unicodedata

import torch

__all__ = ["ByteTokenizer", "PAD_ID", "CLS_ID", "EOS_ID", "VOCAB_SIZE"]

PAD_ID = 0
"""Padding after the end of a caption; attention ignores it."""
CLS_ID = 1
"""First token of every caption; its output is the caption's embedding."""
EOS_ID = 2
"""Token after the last byte of a caption."""
_OFFSET = 3
VOCAB_SIZE = 256 + _OFFSET
"""Three specials and 256 byte values."""


class ByteTokenizer:
    """UTF-8 bytes as tokens, framed by ``[CLS] ... [EOS]`` and padded to ``max_len``.

    Args:
        max_len: Length of every encoded caption, specials included (at least 3).

    Raises:
        ValueError: If ``max_len`` is below 3.
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, max_len: int) -> None:
        if max_len < 3:
            raise ValueError(f"max_len={max_len} is too small; allowed >= 3 ([CLS], one byte, [EOS])")
        self.max_len = max_len

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of one caption.

        Args:
            text: Any string; ``""`` gives ``[CLS] [EOS]`` and padding.

        Returns:
            ``LongTensor[max_len]``.
        """
        data = unicodedata.normalize("NFC", text).encode("utf-8")
        room = self.max_len - 2
        if len(data) > room:
            # The input is valid UTF-8, so "ignore" drops only a character cut in half at the end.
            data = data[:room].decode("utf-8", errors="ignore").encode("utf-8")
        ids = torch.full((self.max_len,), PAD_ID, dtype=torch.long)
        ids[0] = CLS_ID
        if data:
            ids[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + _OFFSET
        ids[1 + len(data)] = EOS_ID
        return ids

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """``LongTensor[N, max_len]`` of several captions."""
        if not texts:
            return torch.zeros(0, self.max_len, dtype=torch.long)
        return torch.stack([self.encode(t) for t in texts])

    def decode(self, ids: torch.Tensor) -> str:
        """The text of one encoded caption (specials and padding dropped)."""
        raw = bytes(int(i) - _OFFSET for i in ids.tolist() if int(i) >= _OFFSET)
        return raw.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(max_len={self.max_len})"
