"""Writing one unit: its inputs read and encoded, its samples into tar parts, each part uploaded, a record last.

A unit runs in a worker process (in the calling one for ``shard.workers=1``). Every write names
its path when it fails: an ``OSError`` raised without a file name (``[Errno 28] No space left on
device``) is raised again with the part file or object it was writing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict
from typing import Any, Iterator

from m3i.shard.encode import EncodeOptions, SampleTarWriter, encode_sample, refuse_bombs, tar_bytes
from m3i.shard.files import naming
from m3i.shard.inputs import BadInput, InputItem
from m3i.shard.tars import read_members
from m3i.shard.verify import shard_problem
from m3i.storage import Store, StorageError, open_store

__all__ = ["PROGRESS", "PartWriter", "raw_inputs", "write_unit"]

log = logging.getLogger(__name__)
PROGRESS = "_progress"


def raw_inputs(items: list[InputItem], max_bytes: int) -> Iterator[tuple[InputItem, bytes | None | OSError]]:
    """Each item with its bytes: ``None`` for a file (the encoder reads it), bytes or an error for a tar member."""
    tar_items = [it for it in items if it.member is not None]
    for it in items:
        if it.member is None:
            yield it, None
    by_url: dict[str, dict[str, InputItem]] = {}
    for it in tar_items:
        by_url.setdefault(it.path, {})[it.member] = it
    for url, wanted in by_url.items():
        seen = set()
        try:
            for name, data in read_members(url, set(wanted), max_bytes):
                seen.add(name)
                yield wanted[name], data
        except (StorageError, OSError, ValueError) as e:
            err = OSError(f"tar unreadable: {type(e).__name__}")
            for name, it in wanted.items():
                if name not in seen:
                    seen.add(name)
                    yield it, err
        for name, it in wanted.items():
            if name not in seen:
                yield it, OSError("missing from the tar (it ends early)")


class PartWriter:
    """Writes one unit's samples into tar parts of bounded samples and bytes, each uploaded when full."""

    def __init__(self, store: Store, split: str, unit: int, tmp: str, max_samples: int, max_bytes: int) -> None:
        self.store, self.split, self.unit, self.tmp = store, split, unit, tmp
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self.rewritten: list[str] = []
        """Keys where an object of the same name held other bytes, and was replaced."""
        self._open()

    def _open(self) -> None:
        self.path = os.path.join(self.tmp, f"part-{len(self.shards)}.tar")
        with naming(self.path):
            self.file = open(self.path, "wb", buffering=1 << 20)
        # The tar is a pure function of its samples (mtime 0); its sha256 is taken as it is written.
        self.writer = SampleTarWriter(self.file)
        self.samples, self.nbytes, self.counts = 0, 0, {}

    def write(self, sample: dict[str, Any], source: str) -> None:
        size = tar_bytes(sample)
        # 1024: the two zero blocks that end a tar archive.
        if self.samples and (self.samples >= self.max_samples or self.nbytes + size + 1024 > self.max_bytes):
            self._finish()
            self._open()
        with naming(self.path):
            self.writer.write(sample)
        self.samples += 1
        self.nbytes += size
        self.counts[source] = self.counts.get(source, 0) + 1

    def _finish(self) -> None:
        with naming(self.path):
            sha = self.writer.close()
            self.file.close()
        nbytes = self.writer.size
        if not self.samples:
            return
        # The checksum in the name: a run never replaces a shard some index lists with other bytes.
        key = f"{self.split}/{self.split}-{self.unit:05d}-{len(self.shards):02d}-{sha[:12]}.tar"
        if not self._already_there(key, nbytes, sha):
            with naming(self.store.url(key)):
                self.store.put_file(key, self.path, {"sha256": sha})
        os.remove(self.path)
        self.shards.append({"key": key, "samples": self.samples, "bytes": nbytes, "sha256": sha, "sources": self.counts})

    def _already_there(self, key: str, nbytes: int, sha: str) -> bool:
        """Whether ``key`` already holds these bytes (checked by reading them), so the upload can be skipped."""
        info = self.store.stat(key)
        if info is None:
            return False
        problem = shard_problem(self.store, key, nbytes, sha)
        if problem is None:
            return (info.metadata or {}).get("sha256") == sha
        # Same name, so the same checksum was written once: the bytes were changed since.
        log.warning("shard: %s is damaged (%s); rewriting it", self.store.url(key), problem)
        self.rewritten.append(key)
        return False

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def write_unit(
    out_uri: str, split: str, unit: int, unit_hash: str, items: list[InputItem], classes: list[str], opts: EncodeOptions,
    max_samples: int, max_bytes: int,
) -> dict:
    """Encode, write and upload one unit; returns its record plus ``rewritten`` (damaged shards replaced)."""
    store = open_store(out_uri)
    class_index = {c: i for i, c in enumerate(classes)}
    bad = []
    with tempfile.TemporaryDirectory(prefix="m3i-shard-") as tmp, refuse_bombs():
        parts = PartWriter(store, split, unit, tmp, max_samples, max_bytes)
        for it, raw in raw_inputs(items, opts.max_input_bytes):
            try:
                if isinstance(raw, OSError):
                    raise raw
                sample = encode_sample(it, class_index, opts, raw, bombs_refused=True)
            except OSError as e:
                bad.append(asdict(BadInput(it.source, it.id, str(e))))
                continue
            parts.write(sample, it.source)
        shards = parts.close()
    rec = {"unit_hash": unit_hash, "split": split, "unit": unit, "shards": shards, "bad": bad}
    key = f"{PROGRESS}/{split}-{unit:05d}.json"
    with naming(store.url(key)):
        store.write_json(key, rec)
    return {**rec, "rewritten": parts.rewritten}
