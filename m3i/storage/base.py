"""The object-store interface every backend implements, and its error type."""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

__all__ = ["ObjectInfo", "Store", "StorageError", "sha256_file"]

CHUNK = 1 << 20


class StorageError(RuntimeError):
    """An object-store operation failed for good (after retries, where they apply).

    The message names the store (endpoint and bucket, never credentials), the
    operation and the key.
    """


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a stat returns about one object."""

    key: str
    """The key relative to the store's root prefix."""

    size: int
    """Size in bytes."""

    metadata: dict[str, str] | None = None
    """User metadata stored with the object (e.g. ``sha256``), where the backend keeps it."""

    etag: str | None = None
    """Changes when the object is rewritten: the S3 ETag, or ``<mtime_ns>-<size>`` of a local file."""


def sha256_file(stream: BinaryIO) -> str:
    """Hex sha256 of a readable binary stream, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


class Store(abc.ABC):
    """A flat key space under a root URI: a local folder or an ``s3://bucket/prefix``.

    Keys use ``/`` separators and are relative to the root. Writes of a single object
    are atomic (readers see the old object or the new one, never part of one). Writes
    of several objects become visible together through :meth:`write_manifest`: write
    the objects first, the small manifest last, and read only what a manifest lists.
    """

    uri: str
    """The root URI, e.g. ``/data/shards`` or ``s3://bucket/prefix``."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        """Write ``data`` to ``key`` (replacing it) with optional user metadata."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str, metadata: dict[str, str] | None = None) -> None:
        """Upload a local file (multipart for large files where the backend needs it)."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming, closeable binary reader of ``key``."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str) -> None:
        """Download ``key`` to a local file path (written atomically)."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and metadata of ``key``, or ``None`` if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """The full URI of ``key`` (``file`` path or ``s3://bucket/prefix/key``)."""

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        """Create ``key`` with ``data`` only if no object is there: ``True`` when this call created it,
        ``False`` when ``key`` existed (whoever wrote it first keeps it).

        Atomic against concurrent writers: of several calls racing on one key exactly one returns
        ``True``. This is the one compare-and-swap object stores share (a local folder: a hard link;
        S3: ``PutObject`` with ``If-None-Match: *``); build append-only logs on it.

        Raises:
            StorageError: The backend cannot make the write conditional (a file system without hard
                links, an S3 server that ignores ``If-None-Match``), or the write failed.
        """
        raise StorageError(f"put {self.url(key)}: {type(self).__name__} has no conditional (create-if-absent) write")

    # Derived operations: backends may override with something faster.

    def get_bytes(self, key: str) -> bytes:
        """The whole content of ``key``."""
        with self.open_read(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return self.stat(key) is not None

    def sha256(self, key: str) -> str:
        """Hex sha256 of ``key``'s content (read in full)."""
        with self.open_read(key) as f:
            return sha256_file(f)

    def write_json(self, key: str, obj: Any) -> None:
        """Write a JSON document in one atomic put."""
        self.put_bytes(key, json.dumps(obj, indent=1, sort_keys=True).encode(), {"content-type": "application/json"})

    def read_json(self, key: str) -> Any:
        """Read a JSON document; raises :class:`StorageError` when missing or malformed."""
        try:
            return json.loads(self.get_bytes(key))
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.url(key)} is not valid JSON: {e}") from None

    def write_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        """Publish a multi-object write: call after every object it lists is written.

        The manifest is one small object written in a single atomic put, so readers
        that trust only what a manifest lists never see a half-finished write.
        """
        self.write_json(key, manifest)

    @abc.abstractmethod
    def sub(self, prefix: str) -> "Store":
        """A store of the same backend (and settings) rooted at ``prefix`` below this one."""
