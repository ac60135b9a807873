"""The shard index: what a data set holds, written last, trusted by every reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m3i.storage import Store, StorageError

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_KEY", "ShardInfo", "ShardIndex", "read_index"]

FORMAT = "m3i-shards"
FORMAT_VERSION = 1
INDEX_KEY = "index.json"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard as the index lists it."""

    key: str
    """Key of the tar relative to the data set root, e.g. ``train/train-00003-00.tar``."""
    samples: int
    bytes: int
    sha256: str
    sources: dict[str, int]
    """Samples per source in this shard."""


@dataclass(frozen=True)
class ShardIndex:
    """A parsed ``index.json``."""

    uri: str
    classes: list[str]
    splits: dict[str, list[ShardInfo]]
    raw: dict[str, Any]

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of ``split``; raises ``ValueError`` naming the splits that exist."""
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not in {self.uri}/{INDEX_KEY}; it has {sorted(self.splits)}")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_index(store: Store) -> ShardIndex:
    """Read and check ``index.json`` at the root of ``store``.

    Raises:
        StorageError: When the index is missing or unreadable.
        ValueError: When it is of another format or a newer format version.
    """
    if not store.exists(INDEX_KEY):
        raise StorageError(f"{store.url(INDEX_KEY)} does not exist: run `m3i shard` first (or the run did not finish)")
    raw = store.read_json(INDEX_KEY)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{store.url(INDEX_KEY)}: format={raw.get('format')!r} is not {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{store.url(INDEX_KEY)}: format_version={raw.get('format_version')!r}; this m3i reads {FORMAT_VERSION}"
        )
    splits = {
        name: [ShardInfo(s["key"], s["samples"], s["bytes"], s["sha256"], dict(s["sources"])) for s in sp["shards"]]
        for name, sp in raw["splits"].items()
    }
    return ShardIndex(store.uri, list(raw["classes"]), splits, raw)
