"""Finding a complete checkpoint by URI and getting its files onto local disk, only those needed.

A checkpoint exists only once its ``complete.json`` is written (see
:mod:`m3i.train.checkpoint`); that manifest lists its files and carries the run's
metadata (config, data hashes, run id). Files of a checkpoint in a local folder are
read in place; from ``s3://`` each file is downloaded once, on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3i.storage import LocalStore, StorageError, Store, join_uri, open_store
from m3i.train.checkpoint import MARKER, PREFIX, list_complete

__all__ = ["CheckpointSource", "locate_checkpoint"]

_TAG = re.compile(r"^step-(\d{8})$")


@dataclass
class CheckpointSource:
    """One complete checkpoint: where it is, what its manifest says, and local access to its files."""

    uri: str
    """The checkpoint's folder URI (``.../checkpoints/step-XXXXXXXX``)."""

    store: Store
    """A store rooted at the checkpoint's folder."""

    manifest: dict[str, Any]
    """``complete.json``: step, world size, files, and the run's ``meta`` (config, hashes, run id)."""

    local_dir: Path | None = None
    """Where downloaded files go (``None`` for a local checkpoint, read in place)."""

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def keys(self) -> list[str]:
        """Every file the manifest lists, relative to the checkpoint folder."""
        return [f["key"] for f in self.manifest.get("files", [])]

    def path(self, key: str) -> Path:
        """A local path of file ``key`` of the checkpoint (downloaded on first use).

        Raises:
            StorageError: When ``key`` is not in the manifest or the download fails.
        """
        if key not in self.keys:
            raise StorageError(f"{self.uri}: {key} is not listed in {MARKER}")
        if isinstance(self.store, LocalStore):
            return Path(self.store.url(key))
        if self.local_dir is None:
            raise StorageError(f"{self.uri}: no local folder to download {key} into")
        dst = self.local_dir / key
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.store.get_file(key, str(dst))
        return dst


def locate_checkpoint(uri: str) -> CheckpointSource:
    """The checkpoint at ``uri``: a run's output (its latest complete checkpoint) or one checkpoint's folder.

    Args:
        uri: ``train.output`` of a run, or ``<train.output>/checkpoints/step-XXXXXXXX``.

    Returns:
        The checkpoint, without any file downloaded yet.

    Raises:
        ValueError: When ``uri`` holds no complete checkpoint (the message says where it looked).
        StorageError: When storage fails after retries.
    """
    uri = uri.rstrip("/")
    last = uri.rsplit("/", 1)[-1]
    if _TAG.match(last):
        store = open_store(uri)
        if not store.exists(MARKER):
            raise ValueError(
                f"export.checkpoint={uri!r} is not a complete checkpoint: it has no {MARKER} (a save that did not "
                "finish, or a wrong path); give a run's output folder to take its latest complete checkpoint"
            )
        manifest = store.read_json(MARKER)
        return CheckpointSource(uri, store, manifest)
    refs = list_complete(open_store(uri))
    if not refs:
        raise ValueError(
            f"export.checkpoint={uri!r} holds no complete checkpoint: nothing matches {PREFIX}/step-XXXXXXXX/{MARKER} "
            "under it; give a run's output (train.output) after at least one checkpoint was saved, or one "
            f"checkpoint's folder ({PREFIX}/step-XXXXXXXX)"
        )
    ref = refs[-1]
    ckpt_uri = join_uri(uri, PREFIX, ref.tag)
    return CheckpointSource(ckpt_uri, open_store(ckpt_uri), ref.manifest)
