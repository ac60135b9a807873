"""Writing one unit: its inputs read and encoded, its samples into tar parts, each part uploaded, a record last.

A unit runs in a worker process (in the calling one for ``shard.workers=1``). Its
:class:`UnitWriter` has the shape of mosaicml/streaming's writer: ``write`` each sample,
``flush_shard`` when a part is full, ``finish`` with the unit's record in ``_progress/`` last, so a
record only ever names shards that are there. A re-run trusts a record only while its unit hash
matches the plan and its shards' bytes still hash to the recorded sha256 (:func:`finished_record`).

Every write names its path when it fails: an ``OSError`` raised without a file name (``[Errno 28]
No space left on device``) is raised again with the part file or object it was writing.
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

__all__ = ["PROGRESS", "UnitWriter", "finished_record", "raw_inputs", "record_key", "write_unit"]

log = logging.getLogger(__name__)
PROGRESS = "_progress"


def record_key(split: str, unit: int) -> str:
    """Key of a unit's record, e.g. ``_progress/train-00003.json``."""
    return f"{PROGRESS}/{split}-{unit:05d}.json"


def finished_record(store: Store, split: str, unit: int, unit_hash: str, damaged: list[str]) -> dict | None:
    """The unit's record if it matches the plan and all its shards verify by their bytes, else None.

    A listed shard whose bytes no longer match its sha256 (or that is gone) is appended to ``damaged``
    and the unit is redone, so the index about to be published never lists it as it is.
    """
    key = record_key(split, unit)
    if not store.exists(key):
        return None
    try:
        rec = store.read_json(key)
        if rec.get("unit_hash") != unit_hash:
            return None
        shards = [(s["key"], s["bytes"], s["sha256"]) for s in rec["shards"]]
    except Exception:  # noqa: BLE001 - an unreadable or malformed record just means: redo the unit
        return None
    for k, nbytes, sha in shards:
        # Streamed: the checksum beside a shard (or in S3 metadata) says what was written, not what is there.
        problem = shard_problem(store, k, nbytes, sha)
        if problem is not None:
            log.warning("shard: %s is damaged (%s); its unit is written again", store.url(k), problem)
            damaged.append(k)
            return None
    return rec


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


class UnitWriter:
    """Writes one unit: its samples into tar parts of bounded samples and bytes, each uploaded when full, its record last.

    Args:
        store: The output store.
        split: ``train`` or ``eval``.
        unit: The unit's number within its split.
        unit_hash: The plan's hash of the unit (recorded, for re-runs).
        tmp: A folder for the part being written.
        max_samples: Samples per part at most (``shard.max_samples_per_shard``).
        max_bytes: Bytes per part at most (``shard.max_bytes_per_shard``), unless one sample is larger.
    """

    def __init__(
        self, store: Store, split: str, unit: int, unit_hash: str, tmp: str, max_samples: int, max_bytes: int,
    ) -> None:
        self.store, self.split, self.unit, self.unit_hash, self.tmp = store, split, unit, unit_hash, tmp
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
        """Add one encoded sample of ``source`` to the part being written, flushing the part first when it is full."""
        size = tar_bytes(sample)
        # 1024: the two zero blocks that end a tar archive.
        if self.samples and (self.samples >= self.max_samples or self.nbytes + size + 1024 > self.max_bytes):
            self.flush_shard()
        with naming(self.path):
            self.writer.write(sample)
        self.samples += 1
        self.nbytes += size
        self.counts[source] = self.counts.get(source, 0) + 1

    def flush_shard(self) -> None:
        """Upload the part being written (under its checksum name) and start the next."""
        self._close_part()
        self._open()

    def _close_part(self) -> None:
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

    def finish(self, bad: list[dict[str, str]]) -> dict:
        """Upload the last part, then write the unit's record; returns it plus ``rewritten`` (damaged shards replaced).

        Args:
            bad: The unit's bad inputs (``BadInput`` as dicts), recorded for the index.
        """
        self._close_part()
        rec = {"unit_hash": self.unit_hash, "split": self.split, "unit": self.unit, "shards": self.shards, "bad": bad}
        key = record_key(self.split, self.unit)
        with naming(self.store.url(key)):
            self.store.write_json(key, rec)
        return {**rec, "rewritten": self.rewritten}


def write_unit(
    out_uri: str, split: str, unit: int, unit_hash: str, items: list[InputItem], classes: list[str], opts: EncodeOptions,
    max_samples: int, max_bytes: int,
) -> dict:
    """Encode, write and upload one unit; returns its record plus ``rewritten`` (damaged shards replaced)."""
    store = open_store(out_uri)
    class_index = {c: i for i, c in enumerate(classes)}
    bad = []
    with tempfile.TemporaryDirectory(prefix="m3i-shard-") as tmp, refuse_bombs():
        writer = UnitWriter(store, split, unit, unit_hash, tmp, max_samples, max_bytes)
        for it, raw in raw_inputs(items, opts.max_input_bytes):
            try:
                if isinstance(raw, OSError):
                    raise raw
                sample = encode_sample(it, class_index, opts, raw, bombs_refused=True)
            except OSError as e:
                bad.append(asdict(BadInput(it.source, it.id, str(e))))
                continue
            writer.write(sample, it.source)
        return writer.finish(bad)
