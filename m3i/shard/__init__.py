"""``m3i shard``: raw images -> WebDataset tar shards + ``index.json`` in object storage.

Layout under ``shard.out``::

    index.json                            written last: the only thing readers trust
    train/train-00000-00-<sha>.tar ...    shards: <split>-<unit>-<part>-<first 12 hex of sha256>.tar
    eval/eval-00000-00-<sha>.tar ...
    _progress/train-00000.json ...        per-unit records that make re-runs resume
    _progress/tars/<hash>.json            listings of WebDataset tar inputs
    _lock.json                            held by the run writing this output

The file inputs are ordered by a seeded hash (so sources mix within shards) and cut into
units of ``max_samples_per_shard``; the samples of each WebDataset tar input form units of
their own (one pass over the tar). A unit is split into parts of at most
``max_samples_per_shard`` samples and ``max_bytes_per_shard`` bytes. Each unit is encoded by
a worker process (by this one for ``workers=1``), uploaded, and recorded in ``_progress/``; a
re-run skips every unit whose record matches the plan and whose shards are still there with the
recorded checksum.

Publishing never damages a published data set: a shard's name carries its checksum, so a run
never overwrites a shard with other bytes; the index is written last, and only then are shards
deleted that neither the new index nor the one it replaced lists (readers that opened the
replaced index keep working until the next publish). One run writes an output at a time
(:class:`m3i.shard.lock.OutputLock`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from typing import Any, Iterator

from tqdm import tqdm

from m3i import __version__
from m3i.config import ShardConfig, to_dict
from m3i.shard.encode import EncodeOptions, SampleTarWriter, encode_sample, refuse_bombs, tar_bytes
from m3i.shard.tars import read_members
from m3i.shard.index import FORMAT, FORMAT_VERSION, INDEX_KEY, ShardIndex, ShardInfo, read_index
from m3i.shard.lock import OutputLock, OutputLocked
from m3i.shard.sources import BadInput, InputItem, discover
from m3i.storage import Store, StorageError, open_store

__all__ = ["shard", "ShardError", "ShardIndex", "ShardInfo", "OutputLocked", "read_index", "INDEX_KEY"]

log = logging.getLogger(__name__)
PROGRESS = "_progress"


class ShardError(RuntimeError):
    """The run could not produce a trustworthy data set (e.g. too many bad inputs)."""


def _order_key(seed: int, item: InputItem) -> str:
    return hashlib.sha256(f"{seed}/{item.split}/{item.source}/{item.id}".encode()).hexdigest()


def _plan_units(cfg: ShardConfig, items: list[InputItem]) -> list[tuple[str, int, list[InputItem]]]:
    """(split, unit number, items): file inputs mixed in chunks, then one unit per (split, input tar)."""
    units = []
    for split in ("train", "eval"):
        first = len(units)
        files = sorted((i for i in items if i.split == split and i.member is None), key=lambda i: _order_key(cfg.seed, i))
        n = cfg.max_samples_per_shard
        for start in range(0, len(files), n):
            units.append((split, len(units) - first, files[start : start + n]))
        by_tar: dict[str, list[InputItem]] = {}
        for it in items:
            if it.split == split and it.member is not None:
                by_tar.setdefault(it.path, []).append(it)
        for _url, its in by_tar.items():
            units.append((split, len(units) - first, its))
    return units


def _unit_hash(cfg_hash: str, items: list[InputItem]) -> str:
    h = hashlib.sha256(cfg_hash.encode())
    for it in items:
        h.update(f"{it.source}\t{it.id}\t{it.path}\t{it.split}\t{it.label}\t{it.caption}\t{it.size}".encode())
        if it.member is not None:
            h.update(f"\t{it.member}\t{it.version}".encode())
        h.update(b"\n")
    return h.hexdigest()


def _unit_done(store: Store, split: str, unit: int, unit_hash: str) -> dict | None:
    """The unit's record if it matches the plan and all its shards verify, else None."""
    key = f"{PROGRESS}/{split}-{unit:05d}.json"
    if not store.exists(key):
        return None
    try:
        rec = store.read_json(key)
    except Exception:  # noqa: BLE001 - an unreadable record just means: redo the unit
        return None
    if rec.get("unit_hash") != unit_hash:
        return None
    for s in rec["shards"]:
        info = store.stat(s["key"])
        if info is None or info.size != s["bytes"] or store.sha256(s["key"]) != s["sha256"]:
            return None
    return rec


def _raw_inputs(items: list[InputItem]) -> Iterator[tuple[InputItem, bytes | None | OSError]]:
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
            for name, data in read_members(url, set(wanted)):
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


class _PartWriter:
    """Writes one unit's samples into tar parts of bounded samples and bytes, each uploaded when full."""

    def __init__(self, store: Store, split: str, unit: int, tmp: str, max_samples: int, max_bytes: int) -> None:
        self.store, self.split, self.unit, self.tmp = store, split, unit, tmp
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        self.path = os.path.join(self.tmp, f"part-{len(self.shards)}.tar")
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
        self.writer.write(sample)
        self.samples += 1
        self.nbytes += size
        self.counts[source] = self.counts.get(source, 0) + 1

    def _finish(self) -> None:
        sha = self.writer.close()
        nbytes = self.writer.size
        self.file.close()
        if not self.samples:
            return
        # The checksum in the name: a run never replaces a shard some index lists with other bytes.
        key = f"{self.split}/{self.split}-{self.unit:05d}-{len(self.shards):02d}-{sha[:12]}.tar"
        info = self.store.stat(key)
        if info is None or info.size != nbytes or (info.metadata or {}).get("sha256") != sha:
            self.store.put_file(key, self.path, {"sha256": sha})
        os.remove(self.path)
        self.shards.append({"key": key, "samples": self.samples, "bytes": nbytes, "sha256": sha, "sources": self.counts})

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def _write_unit(
    out_uri: str, split: str, unit: int, unit_hash: str, items: list[InputItem], classes: list[str], opts: EncodeOptions,
    max_samples: int, max_bytes: int,
) -> dict:
    """Encode, write and upload one unit; runs in a worker process (in the calling one for a single worker)."""
    store = open_store(out_uri)
    class_index = {c: i for i, c in enumerate(classes)}
    bad = []
    with tempfile.TemporaryDirectory(prefix="m3i-shard-") as tmp, refuse_bombs():
        parts = _PartWriter(store, split, unit, tmp, max_samples, max_bytes)
        for it, raw in _raw_inputs(items):
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
    store.write_json(f"{PROGRESS}/{split}-{unit:05d}.json", rec)
    return rec


def _collect_garbage(store: Store, keep: set[str]) -> int:
    """Delete shard tars no index in ``keep`` lists (leftovers of failed or replaced runs); returns how many."""
    gone = 0
    for obj in list(store.list("")):
        parts = obj.key.split("/")
        if len(parts) == 2 and not parts[0].startswith("_") and parts[1].endswith(".tar") and obj.key not in keep:
            store.delete(obj.key)
            gone += 1
    return gone


def _listed_shards(store: Store) -> set[str]:
    """The shard keys the published index lists (empty when there is none or it cannot be read)."""
    try:
        raw = store.read_json(INDEX_KEY) if store.exists(INDEX_KEY) else None
    except StorageError:
        return set()
    if not isinstance(raw, dict):
        return set()
    return {s["key"] for sp in raw.get("splits", {}).values() for s in sp.get("shards", [])}


def shard(cfg: ShardConfig, *, progress: bool = True) -> ShardIndex:
    """Shard every input named in ``cfg`` into ``cfg.out`` and publish ``index.json``.

    Args:
        cfg: The ``shard`` config section.
        progress: Show a progress bar (stderr).

    Returns:
        The published index.

    Raises:
        ValueError: A named input folder or file does not exist or has the wrong layout.
        ShardError: More than ``cfg.max_bad_fraction`` of the inputs were bad; no index
            is published, finished units are kept for a re-run.
        m3i.storage.StorageError: The output store failed after retries.
    """
    t0 = time.monotonic()
    store = open_store(cfg.out)
    with OutputLock(store, cfg.lock_stale_seconds) as lock:
        return _shard_locked(cfg, store, lock, progress, t0)


def _shard_locked(cfg: ShardConfig, store: Store, lock: OutputLock, progress: bool, t0: float) -> ShardIndex:
    found = discover(
        cfg.labelled, cfg.captions, cfg.unlabelled, cfg.eval_labelled, cfg.webdataset,
        allow_outside_paths=cfg.allow_outside_paths, scan_cache=store,
    )
    items = _split_eval(found.items, cfg)
    settings = to_dict(cfg)
    plan_fields = {k: settings[k] for k in ("max_samples_per_shard", "max_bytes_per_shard", "resize", "reencode", "jpeg_quality", "seed")}
    cfg_hash = hashlib.sha256(json.dumps([FORMAT_VERSION, plan_fields, found.classes], sort_keys=True).encode()).hexdigest()
    units = _plan_units(cfg, items)
    opts = EncodeOptions(cfg.resize, cfg.reencode, cfg.jpeg_quality)
    workers = cfg.workers or os.cpu_count() or 1

    records: dict[tuple[str, int], dict] = {}
    todo = []
    for split, u, its in units:
        uh = _unit_hash(cfg_hash, its)
        rec = _unit_done(store, split, u, uh)
        if rec is not None:
            records[(split, u)] = rec
        else:
            todo.append((split, u, uh, its))
    reused = len(records)
    bar = tqdm(total=sum(len(t[3]) for t in todo), unit="img", desc="shard", disable=not progress)
    args = (found.classes, opts, cfg.max_samples_per_shard, cfg.max_bytes_per_shard)
    if min(workers, len(todo)) == 1:
        # One process would only add its start, the pickling of every item and an idle parent; the
        # units are written in this process instead, the same bytes in the same order.
        for split, u, uh, its in todo:
            records[(split, u)] = _write_unit(store.uri, split, u, uh, its, *args)
            bar.update(len(its))
    elif todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futs = {
                pool.submit(_write_unit, store.uri, split, u, uh, its, *args): (split, u, len(its))
                for split, u, uh, its in todo
            }
            for fut in as_completed(futs):
                split, u, n = futs[fut]
                records[(split, u)] = fut.result()
                bar.update(n)
    bar.close()

    bad = [asdict(b) for b in found.bad] + [b for k in sorted(records) for b in records[k]["bad"]]
    good = sum(s["samples"] for r in records.values() for s in r["shards"])
    total = good + len(bad)
    if total == 0:
        raise ShardError("shard: the inputs hold no images")
    frac = len(bad) / total
    if frac > cfg.max_bad_fraction:
        reasons = "; ".join(f"{b['source']}:{b['id']}: {b['reason']}" for b in bad[:5])
        raise ShardError(
            f"shard: {len(bad)} of {total} inputs are bad ({frac:.1%}), more than shard.max_bad_fraction="
            f"{cfg.max_bad_fraction}; first ones: {reasons}. No index was written; fix the inputs or raise the limit."
        )

    index = _build_index(cfg, settings, found.classes, records, bad, cfg_hash, items)
    replaced = _listed_shards(store)
    lock.check()
    store.write_manifest(INDEX_KEY, index)
    listed = {s["key"] for sp in index["splits"].values() for s in sp["shards"]}
    removed = _collect_garbage(store, listed | replaced)
    if removed:
        log.info("shard: removed %d shards no index lists any more", removed)
    elapsed = time.monotonic() - t0
    log.info("shard: %d samples in %d shards (%d units reused) in %.1fs", good, sum(len(r["shards"]) for r in records.values()), reused, elapsed)
    result = read_index(store)
    result.raw["run"] = {"seconds": elapsed, "units_written": len(todo), "units_reused": reused}
    return result


def _split_eval(items: list[InputItem], cfg: ShardConfig) -> list[InputItem]:
    """Move ``eval_fraction`` of each labelled class to the eval split (seeded, stable)."""
    if cfg.eval_fraction <= 0:
        return items
    by_class: dict[str, list[InputItem]] = {}
    for it in items:
        if it.source == "labelled" and it.split == "train":
            by_class.setdefault(it.label or "", []).append(it)
    moved: set[tuple[str, str]] = set()
    for its in by_class.values():
        its = sorted(its, key=lambda i: _order_key(cfg.seed + 1, i))
        n = int(round(cfg.eval_fraction * len(its)))
        moved |= {(i.source, i.id) for i in its[:n]}
    out = []
    for it in items:
        if (it.source, it.id) in moved:
            it = dataclasses.replace(it, split="eval")
        out.append(it)
    return out


def _build_index(cfg, settings, classes, records, bad, cfg_hash, items) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for (split, _u), rec in sorted(records.items()):
        sp = splits.setdefault(split, {"shards": [], "samples": 0, "sources": {}})
        for s in rec["shards"]:
            sp["shards"].append(s)
            sp["samples"] += s["samples"]
            for src, n in s["sources"].items():
                sp["sources"][src] = sp["sources"].get(src, 0) + n
    totals: dict[str, int] = {}
    for sp in splits.values():
        for src, n in sp["sources"].items():
            totals[src] = totals.get(src, 0) + n
    listing = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.split, i.source, i.id)):
        listing.update(f"{it.split}\t{it.source}\t{it.id}\t{it.size}\t{it.label}\t{it.caption}\n".encode())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "m3i_version": __version__,
        "created_unix": int(time.time()),
        "config": settings,
        "plan_sha256": cfg_hash,
        "inputs_sha256": listing.hexdigest(),
        "classes": classes,
        "splits": splits,
        "totals": {"samples": sum(totals.values()), "sources": totals},
        "bad": {"count": len(bad), "items": bad},
    }
