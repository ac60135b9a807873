"""Checking shards against their record by their bytes: for reuse, and for ``m3i shard --verify``.

A store's own checksum (the ``sha256`` metadata beside a shard, an S3 object's metadata) says what
was written, not what is there now; these checks stream the bytes and hash them, in 1 MiB pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from m3i.artifacts.dataset import INDEX_KEY, read_index
from m3i.shard.collection import is_shard_key
from m3i.storage import Store, StorageError, open_store
from m3i.storage.base import sha256_file

__all__ = ["Verification", "shard_problem", "stream_sha256", "verify"]


def stream_sha256(store: Store, key: str) -> str:
    """Hex sha256 of the bytes of ``key`` as they are now, streamed (never whole in memory)."""
    with store.open_read(key) as f:
        return sha256_file(f)


def shard_problem(store: Store, key: str, size: int, sha256: str) -> str | None:
    """Why the object at ``key`` is not the recorded shard (``missing``, ``size ...``, ``sha256 ...``), or None."""
    info = store.stat(key)
    if info is None:
        return "missing"
    if info.size != size:
        return f"size {info.size} bytes, recorded {size}"
    try:
        actual = stream_sha256(store, key)
    except (StorageError, OSError) as e:
        return f"unreadable ({e})"
    if actual != sha256:
        return f"sha256 {actual[:12]}..., recorded {sha256[:12]}... (its bytes changed)"
    return None


@dataclass
class Verification:
    """What ``verify`` found in one data set."""

    uri: str
    shards: int = 0
    """Shards the index lists."""
    bytes: int = 0
    """Bytes of the listed shards that were read and hashed."""
    damaged: list[tuple[str, str]] = field(default_factory=list)
    """(key, problem) for each listed shard that is missing or whose size or sha256 differs."""
    unlisted: list[str] = field(default_factory=list)
    """Shard files the index does not list: the replaced index's (kept one publish for its readers) or a failed run's."""
    error: str | None = None
    """Why the index itself could not be read, if it could not."""

    @property
    def ok(self) -> bool:
        """Whether the index reads and every shard it lists is there with its recorded size and sha256."""
        return self.error is None and not self.damaged


def verify(uri: str) -> Verification:
    """Check the data set at ``uri`` against its ``index.json``: every listed shard's presence, size and sha256.

    Args:
        uri: The data set root (``shard.out``): a local folder or ``s3://bucket/prefix``.

    Returns:
        What was found; ``.ok`` is False when the index is unreadable or any listed shard is damaged.
    """
    store = open_store(uri)
    out = Verification(store.uri)
    try:
        index = read_index(store)
    except (StorageError, ValueError, KeyError, TypeError, AttributeError) as e:  # missing, not JSON, malformed
        out.error = f"{store.url(INDEX_KEY)}: {e}"
        return out
    listed = set()
    for split in sorted(index.splits):
        for s in index.shards(split):
            listed.add(s.key)
            out.shards += 1
            problem = shard_problem(store, s.key, s.bytes, s.sha256)
            if problem is None:
                out.bytes += s.bytes
            else:
                out.damaged.append((s.key, problem))
    for obj in store.list(""):
        if is_shard_key(obj.key) and obj.key not in listed:
            out.unlisted.append(obj.key)
    return out
