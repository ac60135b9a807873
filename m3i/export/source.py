"""Finding a complete, intact checkpoint by URI and getting its files onto local disk, only those needed.

A checkpoint exists only once its ``complete.json`` is written (see
:mod:`m3i.train.checkpoint`); that manifest lists its files with their sizes and sha256 and
carries the run's metadata (config, data hashes, run id). Given a run's output, the newest
checkpoint whose marker parses and whose files all have their recorded sizes (one listing) is
taken; newer ones that do not verify are logged with the reason and skipped. Files of a
checkpoint in a local folder are read in place; from ``s3://`` each file is downloaded once, on
first use. Either way a file's sha256 is checked on first use, where the manifest records one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3i.storage import LocalStore, StorageError, Store, join_uri, open_store
from m3i.train.manifest import MARKER, PREFIX, manifest_problem, scan, verify_file

__all__ = ["CheckpointSource", "locate_checkpoint"]

log = logging.getLogger(__name__)

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

    older: list[str] = field(default_factory=list)
    """URIs of the run's older intact checkpoints, newest first (named when this one turns out damaged)."""

    _verified: set[str] = field(default_factory=set, repr=False)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def keys(self) -> list[str]:
        """Every file the manifest lists, relative to the checkpoint folder."""
        return [f["key"] for f in self.manifest.get("files", [])]

    def path(self, key: str) -> Path:
        """A local path of file ``key`` of the checkpoint (downloaded on first use), checked against its manifest entry.

        Raises:
            StorageError: When ``key`` is not in the manifest, the download fails, or the file does
                not have the size and sha256 the manifest records (the message names the run's
                next older intact checkpoint).
        """
        entry = next((f for f in self.manifest.get("files", []) if f.get("key") == key), None)
        if entry is None:
            raise StorageError(f"{self.uri}: {key} is not listed in {MARKER}")
        if isinstance(self.store, LocalStore):
            dst = Path(self.store.url(key))
        elif self.local_dir is None:
            raise StorageError(f"{self.uri}: no local folder to download {key} into")
        else:
            dst = self.local_dir / key
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.store.get_file(key, str(dst))
        if key not in self._verified:
            why = verify_file(dst, entry) if dst.exists() else f"{key} is missing"
            if why:
                if not isinstance(self.store, LocalStore):
                    dst.unlink(missing_ok=True)
                hint = f"; the run's next older intact checkpoint is {self.older[0]}" if self.older else ""
                raise StorageError(f"checkpoint {self.uri} is damaged: {why}{hint}")
            self._verified.add(key)
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
        try:
            manifest = store.read_json(MARKER)
        except StorageError as e:
            manifest, why = None, f"{MARKER} is unreadable ({str(e)[-200:]})"
        else:
            why = manifest_problem(manifest, last, {o.key: o.size for o in store.list("")})
        if why:
            raise ValueError(
                f"export.checkpoint={uri!r} is damaged: {why}; give the run's output folder to take its newest intact "
                "checkpoint, or an older checkpoint's folder"
            )
        return CheckpointSource(uri, store, manifest)
    intact, skipped, _ = scan(open_store(uri))
    for tag, why in skipped:
        log.warning("checkpoint %s skipped: %s", join_uri(uri, PREFIX, tag), why)
    if not intact:
        damaged = f"; {len(skipped)} claim completion but do not verify ({skipped[-1][0]}: {skipped[-1][1]})" if skipped else ""
        raise ValueError(
            f"export.checkpoint={uri!r} holds no complete checkpoint: nothing matches {PREFIX}/step-XXXXXXXX/{MARKER} "
            f"that verifies under it{damaged}; give a run's output (train.output) after at least one checkpoint was saved, "
            f"or one checkpoint's folder ({PREFIX}/step-XXXXXXXX)"
        )
    ref = intact[-1]
    if skipped and ref.step < max(int(_TAG.match(t).group(1)) for t, _ in skipped):
        log.warning("export: using checkpoint %s, the newest that verifies", ref.tag)
    ckpt_uri = join_uri(uri, PREFIX, ref.tag)
    older = [join_uri(uri, PREFIX, r.tag) for r in reversed(intact[:-1])]
    return CheckpointSource(ckpt_uri, open_store(ckpt_uri), ref.manifest, older=older)
