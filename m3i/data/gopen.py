"""An ``s3://`` scheme for webdataset's ``gopen``, through the minio client.

webdataset 1.0 opens URLs through ``webdataset.gopen.gopen_schemes``; it has no S3
handler of its own (and shelling out to a CLI is not an option in our images), so
we register one that streams through :class:`m3i.storage.S3Store`, with its retries
and resume-on-disconnect.
"""

from __future__ import annotations

import importlib
import os
from typing import BinaryIO

from m3i.storage import S3Store, parse_s3_uri

__all__ = ["register_s3_scheme", "open_url"]

# One client per (process, bucket): clients hold connection pools, and a pool inherited
# through fork would share sockets between DataLoader workers.
_stores: dict[tuple[int, str], S3Store] = {}


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> BinaryIO:
    if mode[0] != "r":
        raise ValueError(f"mode={mode!r}: the s3 scheme of gopen only reads; write through m3i.storage")
    bucket, key = parse_s3_uri(url)
    slot = (os.getpid(), bucket)
    store = _stores.get(slot)
    if store is None:
        store = _stores[slot] = S3Store(f"s3://{bucket}")
    return store.open_read(key)


def register_s3_scheme() -> None:
    """Make ``webdataset.gopen`` (and so every webdataset pipeline) read ``s3://`` URLs."""
    module = importlib.import_module("webdataset.gopen")
    module.gopen_schemes["s3"] = _gopen_s3


def open_url(url: str) -> BinaryIO:
    """Open a local path, ``file://`` or ``s3://`` URL for streaming reads via webdataset's gopen."""
    register_s3_scheme()
    module = importlib.import_module("webdataset.gopen")
    return module.gopen(url, "rb")
