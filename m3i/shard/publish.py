"""Publishing a data set without damaging the published one: the index built from the units' records,
written last, and only then the garbage collected.

A shard's name carries its checksum (:class:`m3i.shard.writer.UnitWriter`), so a run never
overwrites a shard with other bytes; the index is written last, under the output lock, and only
then are shards deleted that neither the new index nor the one it replaced lists (readers that
opened the replaced index keep working until the next publish; :mod:`m3i.shard.collection`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from m3i import __version__
from m3i.artifacts.dataset import FORMAT, FORMAT_VERSION, INDEX_KEY
from m3i.shard.collection import collect_garbage, listed_shards
from m3i.shard.files import naming
from m3i.shard.lock import OutputLock
from m3i.shard.plan import Plan
from m3i.storage import Store

__all__ = ["build_index", "publish"]

log = logging.getLogger(__name__)


def _inputs_sha256(plan: Plan) -> str:
    """Hash of the listing of every input the plan holds (split, source, id, size, label, caption)."""
    listing = hashlib.sha256()
    for it in sorted(plan.items, key=lambda i: (i.split, i.source, i.id)):
        listing.update(f"{it.split}\t{it.source}\t{it.id}\t{it.size}\t{it.label}\t{it.caption}\n".encode())
    return listing.hexdigest()


def build_index(plan: Plan, records: dict[tuple[str, int], dict], bad: list[dict[str, str]]) -> dict[str, Any]:
    """The ``index.json`` of a run: every unit's shards by split, sample counts per source, the bad inputs.

    Args:
        plan: The run's plan.
        records: Each unit's record by (split, unit number), reused or just written.
        bad: Every bad input (``BadInput`` as dicts): the listing's, then each unit's in unit order.
    """
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
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "m3i_version": __version__,
        "created_unix": int(time.time()),
        "config": plan.settings,
        "plan_sha256": plan.plan_sha256,
        "inputs_sha256": _inputs_sha256(plan),
        "classes": plan.found.classes,
        "splits": splits,
        "totals": {"samples": sum(totals.values()), "sources": totals},
        "bad": {"count": len(bad), "items": bad},
    }


def publish(store: Store, index: dict[str, Any], lock: OutputLock) -> int:
    """Write ``index`` as the data set's index, last, then delete the shards no index protects.

    Args:
        store: The output store.
        index: What :func:`build_index` built.
        lock: The run's output lock, checked still held right before the index is written.

    Returns:
        How many unlisted shards were deleted.

    Raises:
        m3i.shard.lock.OutputLocked: Another run took the output over; nothing was published.
    """
    replaced = listed_shards(store)
    lock.check()
    with naming(store.url(INDEX_KEY)):
        store.write_manifest(INDEX_KEY, index)
    listed = {s["key"] for sp in index["splits"].values() for s in sp["shards"]}
    removed = collect_garbage(store, listed | replaced)
    if removed:
        log.info("shard: removed %d shards no index lists any more", removed)
    return removed
