"""Object storage chosen by URI: a local folder (or ``file://``) or ``s3://bucket/prefix``.

    store = open_store("s3://datasets/demo")      # endpoint and credentials from env
    store.put_bytes("a/b.txt", b"hi")
    store.write_manifest("index.json", {...})     # last: makes the write visible

See :mod:`m3i.storage.s3` for the environment variables of S3 endpoints.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from m3i.storage.base import ObjectInfo, StorageError, Store, sha256_file
from m3i.storage.local import LocalStore
from m3i.storage.s3 import S3Settings, S3Store, parse_s3_uri

__all__ = [
    "ObjectInfo",
    "LocalStore",
    "S3Settings",
    "S3Store",
    "StorageError",
    "Store",
    "is_remote",
    "join_uri",
    "open_store",
    "parse_s3_uri",
    "sha256_file",
]

SCHEMES = ("file", "s3")


def open_store(uri: str | os.PathLike) -> Store:
    """Open the store rooted at ``uri``.

    Args:
        uri: A local path, ``file:///abs/path``, or ``s3://bucket[/prefix]``.

    Returns:
        A :class:`LocalStore` or :class:`S3Store`.

    Raises:
        ValueError: On an empty URI or an unsupported scheme.
    """
    text = os.fspath(uri)
    if not text:
        raise ValueError("storage uri='' is empty; give a local path or s3://bucket/prefix")
    p = urlparse(text)
    if p.scheme == "s3":
        return S3Store(text)
    if p.scheme == "file":
        return LocalStore(p.path)
    if p.scheme and len(p.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"storage uri={text!r} has scheme {p.scheme!r}; allowed schemes are {list(SCHEMES)} or a plain path")
    return LocalStore(text)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` points at an object store rather than the local file system."""
    return urlparse(os.fspath(uri)).scheme == "s3"


def join_uri(uri: str, *keys: str) -> str:
    """``uri`` joined with ``/``-separated keys (works for paths and s3:// URIs)."""
    out = os.fspath(uri).rstrip("/")
    for k in keys:
        k = k.strip("/")
        if k:
            out = f"{out}/{k}"
    return out
