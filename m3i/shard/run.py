"""The run: :func:`shard` plans, writes the units a re-run cannot reuse, and publishes, under the output lock.

Each unit is encoded by a worker process (by this one for ``workers=1``), uploaded, and recorded
in ``_progress/``; a re-run skips every unit whose record matches the plan and whose shards' bytes
still hash to the recorded sha256 (read and hashed as a stream, not taken from the store's
metadata); a unit with a damaged shard is written again and the shard replaced
(``run.shards_repaired``). Too many bad inputs end the run before anything is published.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict

from tqdm import tqdm

from m3i.artifacts.dataset import ShardIndex, read_index
from m3i.config import ShardConfig
from m3i.shard.encode import EncodeOptions
from m3i.shard.lock import OutputLock
from m3i.shard.plan import Plan, Unit, make_plan
from m3i.shard.publish import build_index, publish
from m3i.shard.writer import finished_record, write_unit
from m3i.storage import Store, open_store

__all__ = ["ShardError", "shard"]

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """The run could not produce a trustworthy data set (e.g. too many bad inputs)."""


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
    plan = make_plan(cfg, store)
    records: dict[tuple[str, int], dict] = {}
    todo: list[Unit] = []
    damaged: list[str] = []
    for unit in plan.units:
        rec = finished_record(store, unit.split, unit.number, unit.unit_hash, damaged)
        if rec is not None:
            records[(unit.split, unit.number)] = rec
        else:
            todo.append(unit)
    reused = len(records)
    _write_units(cfg, store, plan, todo, records, progress)

    bad = _bad_inputs(cfg, plan, records)
    publish(store, build_index(plan, records, bad), lock)
    elapsed = time.monotonic() - t0
    good = sum(s["samples"] for r in records.values() for s in r["shards"])
    log.info("shard: %d samples in %d shards (%d units reused) in %.1fs", good, sum(len(r["shards"]) for r in records.values()), reused, elapsed)
    result = read_index(store)
    # Shards found damaged (bytes changed, or gone) and written again with the bytes their name says.
    rewritten = sorted({*damaged, *(k for r in records.values() for k in r.get("rewritten", ()))})
    result.raw["run"] = {"seconds": elapsed, "units_written": len(todo), "units_reused": reused, "shards_repaired": rewritten}
    return result


def _write_units(
    cfg: ShardConfig, store: Store, plan: Plan, todo: list[Unit], records: dict[tuple[str, int], dict], progress: bool,
) -> None:
    """Write every unit in ``todo``, adding its record to ``records``: in worker processes, or in this one."""
    opts = EncodeOptions(cfg.resize, cfg.reencode, cfg.jpeg_quality, cfg.max_input_bytes)
    workers = min(cfg.workers or os.cpu_count() or 1, len(todo))
    args = (plan.found.classes, opts, cfg.max_samples_per_shard, cfg.max_bytes_per_shard)
    bar = tqdm(total=sum(len(u.items) for u in todo), unit="img", desc="shard", disable=not progress)
    if workers == 1:
        # One process would only add its start, the pickling of every item and an idle parent; the
        # units are written in this process instead, the same bytes in the same order.
        for u in todo:
            records[(u.split, u.number)] = write_unit(store.uri, u.split, u.number, u.unit_hash, u.items, *args)
            bar.update(len(u.items))
    elif todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = {pool.submit(write_unit, store.uri, u.split, u.number, u.unit_hash, u.items, *args): u for u in todo}
            for fut in as_completed(futs):
                u = futs[fut]
                records[(u.split, u.number)] = fut.result()
                bar.update(len(u.items))
    bar.close()


def _bad_inputs(cfg: ShardConfig, plan: Plan, records: dict[tuple[str, int], dict]) -> list[dict[str, str]]:
    """Every bad input (the listing's, then each unit's in unit order), once checked against ``shard.max_bad_fraction``.

    Raises:
        ShardError: The inputs hold no images, or more than ``shard.max_bad_fraction`` of them are bad.
    """
    bad = [asdict(b) for b in plan.found.bad] + [b for k in sorted(records) for b in records[k]["bad"]]
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
    return bad
