"""``m3i shard``: raw images -> WebDataset tar shards + ``index.json`` in object storage.

Layout under ``shard.out``::

    index.json                         written last: the only thing readers trust
    train/train-00000-00.tar ...       shards: <split>-<unit>-<part>.tar
    eval/eval-00000-00.tar ...
    _progress/train-00000.json ...     per-unit records that make re-runs resume

The inputs are ordered by a seeded hash (so sources mix within shards) and cut into
units of ``max_samples_per_shard``; a unit is split further into parts when its bytes
pass ``max_bytes_per_shard``. Each unit is encoded by a worker process, uploaded, and
recorded in ``_progress/``; a re-run skips every unit whose record matches the plan
and whose shards are still there with the recorded checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from typing import Any

import webdataset as wds
from tqdm import tqdm

from m3i import __version__
from m3i.config import ShardConfig, to_dict
from m3i.shard.encode import EncodeOptions, encode_sample, tar_bytes
from m3i.shard.index import FORMAT, FORMAT_VERSION, INDEX_KEY, ShardIndex, ShardInfo, read_index
from m3i.shard.sources import BadInput, InputItem, discover
from m3i.storage import Store, open_store

__all__ = ["shard", "ShardError", "ShardIndex", "ShardInfo", "read_index", "INDEX_KEY"]

log = logging.getLogger(__name__)
PROGRESS = "_progress"


class ShardError(RuntimeError):
    """The run could not produce a trustworthy data set (e.g. too many bad inputs)."""


def _order_key(seed: int, item: InputItem) -> str:
    return hashlib.sha256(f"{seed}/{item.split}/{item.source}/{item.id}".encode()).hexdigest()


def _plan_units(cfg: ShardConfig, items: list[InputItem]) -> list[tuple[str, int, list[InputItem]]]:
    units = []
    for split in ("train", "eval"):
        its = sorted((i for i in items if i.split == split), key=lambda i: _order_key(cfg.seed, i))
        n = cfg.max_samples_per_shard
        for u, start in enumerate(range(0, len(its), n)):
            units.append((split, u, its[start : start + n]))
    return units


def _unit_hash(cfg_hash: str, items: list[InputItem]) -> str:
    h = hashlib.sha256(cfg_hash.encode())
    for it in items:
        h.update(f"{it.source}\t{it.id}\t{it.path}\t{it.split}\t{it.label}\t{it.caption}\t{it.size}\n".encode())
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


def _write_unit(
    out_uri: str, split: str, unit: int, unit_hash: str, items: list[InputItem], classes: list[str], opts: EncodeOptions, max_bytes: int
) -> dict:
    """Encode, write and upload one unit; runs in a worker process."""
    store = open_store(out_uri)
    class_index = {c: i for i, c in enumerate(classes)}
    parts: list[list[dict[str, Any]]] = [[]]
    part_bytes = 0
    bad = []
    sources_of: dict[str, str] = {}
    for it in items:
        try:
            sample = encode_sample(it, class_index, opts)
        except OSError as e:
            bad.append(asdict(BadInput(it.source, it.id, str(e))))
            continue
        size = tar_bytes(sample)
        # 1024: the two zero blocks that end a tar archive.
        if parts[-1] and part_bytes + size + 1024 > max_bytes:
            parts.append([])
            part_bytes = 0
        parts[-1].append(sample)
        part_bytes += size
        sources_of[sample["__key__"]] = it.source
    shards = []
    with tempfile.TemporaryDirectory(prefix="m3i-shard-") as tmp:
        for p, samples in enumerate(parts):
            if not samples:
                continue
            key = f"{split}/{split}-{unit:05d}-{p:02d}.tar"
            path = os.path.join(tmp, f"part-{p}.tar")
            with open(path, "wb") as f:
                # mtime=0 makes the tar a pure function of its samples.
                with wds.TarWriter(f, mtime=0, encoder=False) as w:
                    for s in samples:
                        w.write(s)
            with open(path, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            nbytes = os.path.getsize(path)
            store.put_file(key, path, {"sha256": sha})
            counts: dict[str, int] = {}
            for s in samples:
                src = sources_of[s["__key__"]]
                counts[src] = counts.get(src, 0) + 1
            shards.append({"key": key, "samples": len(samples), "bytes": nbytes, "sha256": sha, "sources": counts})
    rec = {"unit_hash": unit_hash, "split": split, "unit": unit, "shards": shards, "bad": bad}
    store.write_json(f"{PROGRESS}/{split}-{unit:05d}.json", rec)
    return rec


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
    found = discover(cfg.labelled, cfg.captions, cfg.unlabelled, cfg.eval_labelled)
    items = _split_eval(found.items, cfg)
    store = open_store(cfg.out)
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
    if todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futs = {
                pool.submit(_write_unit, store.uri, split, u, uh, its, found.classes, opts, cfg.max_bytes_per_shard): (split, u, len(its))
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
    store.write_manifest(INDEX_KEY, index)
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
            it = InputItem(it.source, it.id, it.path, "eval", it.label, it.caption, it.size)
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
