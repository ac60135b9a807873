"""What every input source produces and every later step reads: an input item, a bad input, a listing.

The folder sources (:mod:`m3i.shard.sources`), caption files (:mod:`m3i.shard.captions`) and
WebDataset tars (:mod:`m3i.shard.tars`) each import these types from here, so none of them
imports another; :func:`m3i.shard.plan.discover` calls them all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_INPUT_BYTES", "IMAGE_EXTENSIONS", "SOURCES", "BadInput", "Discovery", "InputItem"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCES = ("labelled", "captioned", "unlabelled")
# Discovery's default when no cap is given (ShardConfig.max_input_bytes' default).
DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class InputItem:
    """One raw sample to shard."""

    source: str
    """``labelled``, ``captioned`` or ``unlabelled``."""
    id: str
    """Original id: the path relative to its source root (or caption file line)."""
    path: str
    """Absolute path of the image file."""
    split: str
    """``train`` or ``eval``."""
    label: str | None = None
    """Class name, for labelled samples."""
    caption: str | None = None
    """Caption, for image-text samples."""
    size: int = 0
    """File size in bytes at discovery (part of the plan hash, to notice changed inputs)."""
    member: str | None = None
    """For a sample of an existing WebDataset tar (``path`` is then the tar's URL): the image member's name."""
    version: str = ""
    """For a tar member: the tar's ETag or ``<mtime_ns>-<size>`` (part of the plan hash)."""

    @property
    def key(self) -> str:
        """The WebDataset sample key: stable, unique per (source, id), no dots."""
        return f"{self.source}_{hashlib.sha1(f'{self.source}/{self.id}'.encode()).hexdigest()[:20]}"


@dataclass(frozen=True)
class BadInput:
    """An input that was skipped, and why."""

    source: str
    id: str
    reason: str


@dataclass
class Discovery:
    """Every input of every source: the items to shard, the bad inputs, the sorted class names."""

    items: list[InputItem]
    bad: list[BadInput]
    classes: list[str]
