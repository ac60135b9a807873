"""What a complete checkpoint is, and how one is verified without loading it.

A checkpoint folder ``<output>/checkpoints/step-XXXXXXXX`` exists only once its
``complete.json`` is written, last. That marker lists every file of the checkpoint with its
size and sha256 and carries the run's metadata. A checkpoint is intact when the marker parses,
names its own step, and every file it lists is in the store with that size (all checked from
one listing, cheap); a downloaded file is intact when it also has its sha256. Checkpoints
written before hashes were recorded verify by size only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3i.storage import ObjectInfo, Store, StorageError, open_store

__all__ = [
    "MARKER",
    "PREFIX",
    "TAG",
    "CheckpointRef",
    "find_latest",
    "list_complete",
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


