"""A data set: the shard index, what it holds, written last by ``m3i shard``, trusted by every reader.

    index = read_index(open_store("s3://m3i/datasets/1a2b"))    # <root>/index.json
    index.shards("train")                                         # [ShardInfo(key="train/train-00000-00.tar", ...)]
    check_shards(store, index, "train")                           # every listed shard is there (one listing)

Layout under the data set root::

    index.json                      format, classes, splits -> shards (key, samples, bytes, sha256, sources)
    <split>/<split>-NNNNN-NN.tar    WebDataset shards (and a .sha256 beside each)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from m3i.artifacts.errors import damaged
from m3i.storage import Store, StorageError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "INDEX_KEY", "ShardInfo", "ShardIndex", "check_shards", "content_sha256", "read_index",
    "shard_problems",
]

FORMAT = "m3i-shards"
FORMAT_VERSION = 1
INDEX_KEY = "index.json"
_NAMED = 5
"""Missing shards named in a message; the rest are counted."""


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
    try:
        splits = {
            name: [ShardInfo(s["key"], s["samples"], s["bytes"], s["sha256"], dict(s["sources"])) for s in sp["shards"]]
            for name, sp in raw["splits"].items()
        }
        return ShardIndex(store.uri, list(raw["classes"]), splits, raw)
    except (KeyError, TypeError, AttributeError) as e:
        raise damaged("data set index", store.url(INDEX_KEY), f"its {FORMAT} document lacks or garbles {e}",
                      "run `m3i shard` again into this output to write a new one") from None


def content_sha256(index: ShardIndex, splits: Iterable[str]) -> str:
    """sha256 of what scoring on ``splits`` reads: the class names and each split's shards' sha256.

    Unlike the sha256 of ``index.json`` it ignores the index's run record (timings, counts of
    reused units) and where the shards are, so the same images sharded again give the same value.

    Raises:
        ValueError: When a split is not in the index.
    """
    doc = {"classes": index.classes, "splits": {name: sorted(s.sha256 for s in index.shards(name)) for name in splits}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def shard_problems(shards: Iterable[ShardInfo], sizes: Mapping[str, int]) -> list[tuple[str, str]]:
    """``(key, problem)`` of each shard that a listing (``{key: bytes}``) shows missing or of another size than the index's."""
    out = []
    for s in shards:
        have = sizes.get(s.key)
        if have is None:
            out.append((s.key, "missing"))
        elif have != s.bytes:
            out.append((s.key, f"{have} bytes; the index says {s.bytes}"))
    return out


def check_shards(store: Store, index: ShardIndex, split: str) -> None:
    """Every shard of ``split`` is in the store (one listing), before any reader or worker starts.

    Raises:
        DamagedArtifactError: Naming the missing shards (the first few, then a count).
        StorageError: When the listing fails after retries.
    """
    shards = index.shards(split)
    prefixes = sorted({s.key.rsplit("/", 1)[0] + "/" if "/" in s.key else "" for s in shards})
    sizes = {o.key: o.size for p in ([""] if "" in prefixes else prefixes) for o in store.list(p)}
    missing = [key for key, problem in shard_problems(shards, sizes) if problem == "missing"]
    if missing:
        named = ", ".join(missing[:_NAMED]) + (f" and {len(missing) - _NAMED} more" if len(missing) > _NAMED else "")
        raise damaged(
            "data set", index.uri, f"{len(missing)} of {len(shards)} shards of split {split!r} that {INDEX_KEY} lists are missing: {named}",
            "re-run the same `m3i shard` to write them again",
        )
