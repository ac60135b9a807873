"""A checkpoint: its layout, what makes it complete, how it is verified without loading it, and finding one.

    ref = find_latest("runs/demo")                          # newest complete checkpoint that verifies, or None
    src = locate_checkpoint("runs/demo")                    # the same, with local access to its files
    src.path("ds/mp_rank_00_model_states.pt")               # downloaded on first use, size and sha256 checked

Layout under ``<train.output>/checkpoints/``::

    step-00000500/ds/...                   DeepSpeed's files (see :mod:`m3i.artifacts.zero` for their names)
    step-00000500/rank-00003.safetensors   per-rank state (RNG streams, loader position)
    step-00000500/full/state.safetensors   ZeRO-1/2/3: the optimizer state whole (resume on another world size)
    step-00000500/complete.json            written LAST: every file with its size and sha256, and the run's metadata

A checkpoint folder ``<output>/checkpoints/step-XXXXXXXX`` exists only once its
``complete.json`` is written, last. That marker lists every file of the checkpoint with its
size and sha256 and carries the run's metadata. A checkpoint is intact when the marker parses,
names its own step, and every file it lists is in the store with that size (all checked from
one listing, cheap); a downloaded file is intact when it also has its sha256. Checkpoints
written before hashes were recorded verify by size only.

Given a run's output, the newest checkpoint whose marker parses and whose files all have their
recorded sizes (one listing) is taken; newer ones that do not verify are logged with the reason
and skipped. Files of a checkpoint in a local folder are read in place; from ``s3://`` each file
is downloaded once, on first use. Either way a file's sha256 is checked on first use, where the
manifest records one. The writer is :class:`m3i.train.checkpoint.Checkpointer`.
"""


from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3i.artifacts.errors import DamagedArtifactError, DamagedFileError
from m3i.storage import LocalStore, ObjectInfo, Store, StorageError, join_uri, open_store

__all__ = [
    "MARKER",
    "PREFIX",
    "TAG",
    "CheckpointRef",
    "CheckpointSource",
    "find_latest",
    "list_complete",
    "locate_checkpoint",
    "manifest_problem",
    "run_output_of",
    "scan",
    "sha256_of",
    "tag_of",
    "verify_file",
]

log = logging.getLogger(__name__)
PREFIX = "checkpoints"
MARKER = "complete.json"
TAG = re.compile(r"^step-(\d{8})$")
"""A checkpoint folder's name; the group is its step."""
_CHUNK = 1 << 20


def run_output_of(checkpoint_uri: str) -> str | None:
    """The run output holding ``<output>/checkpoints/step-XXXXXXXX``; ``None`` for a checkpoint outside that layout."""
    parts = checkpoint_uri.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == PREFIX:
        return parts[0]
    if len(parts) == 2 and parts[0] == PREFIX:
        return "."
    return None


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint in the store."""

    tag: str
    step: int
    manifest: dict[str, Any]


def tag_of(step: int) -> str:
    """The folder name of checkpoint ``step`` (``step-XXXXXXXX``)."""
    return f"step-{step:08d}"


def manifest_problem(manifest: Any, tag: str, sizes: dict[str, int] | None) -> str:
    """Why ``manifest`` (a parsed ``complete.json`` of ``tag``) is not a usable checkpoint; ``""`` if it is.

    Args:
        manifest: The parsed marker.
        tag: ``step-XXXXXXXX``.
        sizes: ``{key relative to the checkpoint: bytes}`` from a listing; ``None`` skips the size check.
    """
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list) or not isinstance(manifest.get("step"), int):
        return f"{MARKER} is not a checkpoint manifest (no integer step and file list)"
    if tag_of(manifest["step"]) != tag:
        return f"{MARKER} says step {manifest['step']}, the folder is {tag}"
    if sizes is None:
        return ""
    for f in manifest["files"]:
        if not isinstance(f, dict) or not isinstance(f.get("key"), str) or not isinstance(f.get("bytes"), int):
            return f"{MARKER} has a malformed file entry {f!r:.80}"
        have = sizes.get(f["key"])
        if have is None:
            return f"{f['key']} is missing"
        if have != f["bytes"]:
            return f"{f['key']} has {have} bytes, {MARKER} says {f['bytes']} (truncated or replaced)"
    return ""


def _read_marker(store: Store, key: str) -> tuple[Any, str]:
    try:
        return store.read_json(key), ""
    except StorageError as e:
        return None, f"{MARKER} is unreadable ({str(e)[-200:]})"


def scan(store: Store) -> tuple[list[CheckpointRef], list[tuple[str, str]], list[ObjectInfo]]:
    """Every checkpoint under ``checkpoints/`` that claims to be complete, checked against one listing.

    Returns:
        ``(intact, skipped, listing)``: the checkpoints whose marker parses and whose files are all
        there with their recorded sizes, oldest first; ``(tag, reason)`` of the others; and the
        listing itself.

    Raises:
        StorageError: When the listing fails after retries.
    """
    listing = list(store.list(f"{PREFIX}/"))
    sizes: dict[str, dict[str, int]] = {}
    markers = []
    for obj in listing:
        parts = obj.key.split("/", 2)
        if len(parts) == 3 and TAG.match(parts[1]):
            sizes.setdefault(parts[1], {})[parts[2]] = obj.size
            if parts[2] == MARKER:
                markers.append(parts[1])
    intact, skipped = [], []
    for tag in markers:
        manifest, why = _read_marker(store, f"{PREFIX}/{tag}/{MARKER}")
        why = why or manifest_problem(manifest, tag, sizes[tag])
        if why:
            skipped.append((tag, why))
        else:
            intact.append(CheckpointRef(tag, int(manifest["step"]), manifest))
    return sorted(intact, key=lambda r: r.step), skipped, listing


def list_complete(store: Store) -> list[CheckpointRef]:
    """Every complete checkpoint under ``checkpoints/`` that verifies from the listing, oldest first.

    The ones that claim completion but do not verify are logged with the reason and left out.
    """
    intact, skipped, _ = scan(store)
    for tag, why in skipped:
        log.warning("checkpoint %s/%s/%s skipped: %s", store.uri, PREFIX, tag, why)
    return intact


def find_latest(output_uri: str) -> CheckpointRef | None:
    """The newest complete checkpoint of the run at ``output_uri`` that verifies from the listing, if any."""
    refs = list_complete(open_store(output_uri))
    return refs[-1] if refs else None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, entry: dict[str, Any]) -> str:
    """Why the local copy ``path`` of manifest entry ``entry`` is not what was saved; ``""`` if it is.

    Checks the size, and the sha256 where the manifest records one.
    """
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{entry['key']} has {size} bytes, {MARKER} says {entry['bytes']}"
    want = entry.get("sha256")
    if want and sha256_of(path) != want:
        return f"{entry['key']} does not have the sha256 {MARKER} records (damaged or replaced)"
    return ""


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
            StorageError: When ``key`` is not in the manifest or the download fails.
            DamagedFileError: (also a ``StorageError``) When the file does not have the size and
                sha256 the manifest records (the message names the run's next older intact checkpoint).
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
                raise DamagedFileError(f"checkpoint {self.uri} is damaged: {why}{hint}")
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
        DamagedArtifactError: (a ``ValueError``) When the checkpoint named is damaged, or every
            checkpoint of the run that claims completion is.
        StorageError: When storage fails after retries.
    """
    uri = uri.rstrip("/")
    last = uri.rsplit("/", 1)[-1]
    if TAG.match(last):
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
            raise DamagedArtifactError(
                f"export.checkpoint={uri!r} is damaged: {why}; give the run's output folder to take its newest intact "
                "checkpoint, or an older checkpoint's folder"
            )
        return CheckpointSource(uri, store, manifest)
    intact, skipped, _ = scan(open_store(uri))
    for tag, why in skipped:
        log.warning("checkpoint %s skipped: %s", join_uri(uri, PREFIX, tag), why)
    if not intact:
        damaged = f"; {len(skipped)} claim completion but do not verify ({skipped[-1][0]}: {skipped[-1][1]})" if skipped else ""
        raise (DamagedArtifactError if skipped else ValueError)(
            f"export.checkpoint={uri!r} holds no complete checkpoint: nothing matches {PREFIX}/step-XXXXXXXX/{MARKER} "
            f"that verifies under it{damaged}; give a run's output (train.output) after at least one checkpoint was saved, "
            f"or one checkpoint's folder ({PREFIX}/step-XXXXXXXX)"
        )
    ref = intact[-1]
    if skipped and ref.step < max(int(TAG.match(t).group(1)) for t, _ in skipped):
        log.warning("export: using checkpoint %s, the newest that verifies", ref.tag)
    ckpt_uri = join_uri(uri, PREFIX, ref.tag)
    older = [join_uri(uri, PREFIX, r.tag) for r in reversed(intact[:-1])]
    return CheckpointSource(ckpt_uri, open_store(ckpt_uri), ref.manifest, older=older)
