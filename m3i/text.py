"""Caption tokenizers of the image->text branch, chosen by ``model.text_encoder``.

    tok = build_tokenizer(cfg.model)                 # ClipTokenizer or ByteTokenizer
    ids = tok.encode("a red circle in the centre")   # LongTensor[model.text_max_len], zero-padded
    ids = tok.encode_batch(captions)                 # LongTensor[N, model.text_max_len]

- ``open_clip`` (default): :class:`ClipTokenizer`, open_clip's CLIP BPE tokenizer,
  ``<start> bpe... <end> 0...``. Its vocabulary ships inside the open_clip wheel, so nothing
  downloads. [choice: the field's reference subword tokenizer; the paper's BERT WordPiece
  vocabulary would need a download]
- ``byte``: :class:`ByteTokenizer`, ``[CLS] bytes... [EOS] [PAD]...``, for tiny demo models. Text
  is NFC-normalised and UTF-8 encoded; every byte is a token (offset past three specials), so
  the vocabulary is fixed at 259 and no text is ever out of vocabulary. Truncation cuts at a
  character boundary so a caption never ends in half a character.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import TYPE_CHECKING, Any

import torch

from m3i.config.model import TEXT_ENCODERS

if TYPE_CHECKING:
    from m3i.config import ModelConfig

__all__ = [
    "ByteTokenizer",
    "ClipTokenizer",
    "build_tokenizer",
    "PAD_ID",
    "CLS_ID",
    "EOS_ID",
    "VOCAB_SIZE",
    "CLIP_VOCAB_SIZE",
    "CLIP_SOT_ID",
    "CLIP_EOT_ID",
]

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


CLIP_VOCAB_SIZE = 49408
"""Ids of open_clip's CLIP BPE vocabulary: 49152 merges' tokens, 256 bytes and the two specials."""
CLIP_SOT_ID = 49406
"""``<start_of_text>``, first token of every CLIP caption."""
CLIP_EOT_ID = 49407
"""``<end_of_text>``, the highest id: CLIP's text tower pools at its position (``argmax``)."""


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> Any:
    """open_clip's ``SimpleTokenizer`` on its bundled vocabulary, built once per process.

    Imported here, not at module level: ``import open_clip`` takes seconds and a byte-tokenizer
    run never needs it.
    """
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()  # default_bpe(): the vocabulary file inside the installed package


class ClipTokenizer:
    """open_clip's CLIP BPE tokenizer: ``<start> bpe... <end>`` zero-padded to ``max_len``.

    Text is cleaned as CLIP does (ftfy, HTML unescape, whitespace, lower case). A caption longer than
    ``max_len`` is cut and its last token replaced by ``<end>``, so the tower always finds an end token.
    Padding is id 0, which is also the BPE token ``!``: the causal text tower pools at ``<end>`` and
    never looks past it, so padding needs no mask.

    Only ``max_len`` is held: the 49k-entry vocabulary is loaded on first use once per process, so the
    tokenizer is cheap to build and to pickle into loader workers.

    Args:
        max_len: Length of every encoded caption, specials included (at least 2).

    Raises:
        ValueError: If ``max_len`` is below 2.
    """

    vocab_size = CLIP_VOCAB_SIZE

    def __init__(self, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"max_len={max_len} is too small; allowed >= 2 (<start>, <end>)")
        self.max_len = max_len

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of one caption.

        Args:
            text: Any string; ``""`` gives ``<start> <end>`` and padding.

        Returns:
            ``LongTensor[max_len]``.
        """
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """``LongTensor[N, max_len]`` of several captions."""
        if not texts:
            return torch.zeros(0, self.max_len, dtype=torch.long)
        return _clip_bpe()(list(texts), context_length=self.max_len)

    def decode(self, ids: torch.Tensor) -> str:
        """The (cleaned, lower-cased) text of one encoded caption; specials and padding dropped."""
        body = []
        for i in ids.tolist()[1:]:  # after <start>
            if int(i) == CLIP_EOT_ID:
                break
            body.append(int(i))
        return _clip_bpe().decode(body).strip()

    def __repr__(self) -> str:
        return f"ClipTokenizer(max_len={self.max_len})"


def build_tokenizer(model_cfg: ModelConfig) -> ClipTokenizer | ByteTokenizer:
    """The tokenizer of ``model_cfg.text_encoder``, padding to ``model_cfg.text_max_len``.

    Args:
        model_cfg: The ``model`` config section.

    Returns:
        A picklable tokenizer with ``encode(text) -> LongTensor[T]`` and ``encode_batch``.

    Raises:
        ValueError: On an unknown ``text_encoder``.
    """
    kind = model_cfg.text_encoder
    if kind == "open_clip":
        return ClipTokenizer(model_cfg.text_max_len)
    if kind == "byte":
        return ByteTokenizer(model_cfg.text_max_len)
    raise ValueError(f"model.text_encoder={kind!r} is not allowed; choose one of {list(TEXT_ENCODERS)}")
