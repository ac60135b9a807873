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
re-run skips every unit whose record matches the plan and whose shards' bytes still hash to the
recorded sha256 (read and hashed as a stream, not taken from the store's metadata); a unit with a
damaged shard is written again and the shard replaced (``run.shards_repaired``).
:func:`m3i.shard.verify.verify` (``m3i shard --verify``) checks a published data set the same way.

Inputs are read only when they are regular files no larger than ``shard.max_input_bytes``
(:mod:`m3i.shard.files`); everything else, and every odd name or caption, is one bad input.

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
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from m3i import __version__
from m3i.config import ShardConfig, to_dict
from m3i.shard.encode import EncodeOptions
from m3i.shard.index import FORMAT, FORMAT_VERSION, INDEX_KEY, ShardIndex, ShardInfo, read_index
from m3i.shard.lock import OutputLock, OutputLocked
from m3i.shard.inputs import InputItem
from m3i.shard.plan import discover
from m3i.shard.verify import Verification, shard_problem, verify
from m3i.shard.files import naming
from m3i.shard.writer import PROGRESS, write_unit
from m3i.storage import Store, StorageError, open_store

__all__ = [
    "shard", "verify", "Verification", "ShardError", "ShardIndex", "ShardInfo", "OutputLocked", "read_index", "INDEX_KEY",
]

log = logging.getLogger(__name__)


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


def _unit_done(store: Store, split: str, unit: int, unit_hash: str, damaged: list[str]) -> dict | None:
    """The unit's record if it matches the plan and all its shards verify by their bytes, else None.

    A listed shard whose bytes no longer match its sha256 (or that is gone) is appended to ``damaged``
    and the unit is redone, so the index about to be published never lists it as it is.
    """
    key = f"{PROGRESS}/{split}-{unit:05d}.json"
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
        allow_outside_paths=cfg.allow_outside_paths, scan_cache=store, max_input_bytes=cfg.max_input_bytes,
    )
    items = _split_eval(found.items, cfg)
    settings = to_dict(cfg)
    plan_fields = {k: settings[k] for k in ("max_samples_per_shard", "max_bytes_per_shard", "resize", "reencode", "jpeg_quality", "seed")}
    cfg_hash = hashlib.sha256(json.dumps([FORMAT_VERSION, plan_fields, found.classes], sort_keys=True).encode()).hexdigest()
    units = _plan_units(cfg, items)
    opts = EncodeOptions(cfg.resize, cfg.reencode, cfg.jpeg_quality, cfg.max_input_bytes)
    workers = cfg.workers or os.cpu_count() or 1

    records: dict[tuple[str, int], dict] = {}
    todo = []
    damaged: list[str] = []
    for split, u, its in units:
        uh = _unit_hash(cfg_hash, its)
        rec = _unit_done(store, split, u, uh, damaged)
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
            records[(split, u)] = write_unit(store.uri, split, u, uh, its, *args)
            bar.update(len(its))
    elif todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futs = {
                pool.submit(write_unit, store.uri, split, u, uh, its, *args): (split, u, len(its))
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
    with naming(store.url(INDEX_KEY)):
        store.write_manifest(INDEX_KEY, index)
    listed = {s["key"] for sp in index["splits"].values() for s in sp["shards"]}
    removed = _collect_garbage(store, listed | replaced)
    if removed:
        log.info("shard: removed %d shards no index lists any more", removed)
    elapsed = time.monotonic() - t0
    log.info("shard: %d samples in %d shards (%d units reused) in %.1fs", good, sum(len(r["shards"]) for r in records.values()), reused, elapsed)
    result = read_index(store)
    # Shards found damaged (bytes changed, or gone) and written again with the bytes their name says.
    rewritten = sorted({*damaged, *(k for r in records.values() for k in r.get("rewritten", ()))})
    result.raw["run"] = {"seconds": elapsed, "units_written": len(todo), "units_reused": reused, "shards_repaired": rewritten}
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
