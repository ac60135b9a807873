"""Garbage collection: after a publish, the shard tars that no index protects are deleted.

A shard is a ``<split>/<name>.tar`` at the data set root (``_progress/`` and other ``_`` folders
hold none). Two indexes protect theirs: the one just published, and the one it replaced, whose
readers (a loader that opened it a moment ago) keep working until the next publish.
"""

from __future__ import annotations

from m3i.artifacts.dataset import INDEX_KEY
from m3i.storage import Store, StorageError

__all__ = ["collect_garbage", "is_shard_key", "listed_shards"]


def is_shard_key(key: str) -> bool:
    """Whether ``key`` (relative to the data set root) names a shard tar: ``<split>/<name>.tar``."""
    parts = key.split("/")
    return len(parts) == 2 and not parts[0].startswith("_") and parts[1].endswith(".tar")


def listed_shards(store: Store) -> set[str]:
    """The shard keys the published index lists (empty when there is none or it cannot be read)."""
    try:
        raw = store.read_json(INDEX_KEY) if store.exists(INDEX_KEY) else None
    except StorageError:
        return set()
    if not isinstance(raw, dict):
        return set()
    return {s["key"] for sp in raw.get("splits", {}).values() for s in sp.get("shards", [])}


def collect_garbage(store: Store, keep: set[str]) -> int:
    """Delete shard tars no index in ``keep`` lists (leftovers of failed or replaced runs); returns how many."""
    gone = 0
    for obj in list(store.list("")):
        if is_shard_key(obj.key) and obj.key not in keep:
            store.delete(obj.key)
            gone += 1
    return gone
