"""What a run will write: every input listed, the eval split drawn, the inputs cut into hashed units.

The file inputs are ordered by a seeded hash (so sources mix within shards) and cut into units of
``max_samples_per_shard``; the samples of each WebDataset tar input form units of their own (one
pass over the tar). A unit's hash covers the plan's settings and every item it holds, so a
re-run reuses exactly the units whose inputs did not change (:func:`m3i.shard.writer.finished_record`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from m3i.artifacts.dataset import FORMAT_VERSION
from m3i.config import ShardConfig, to_dict
from m3i.shard.captions import add_captions
from m3i.shard.inputs import DEFAULT_MAX_INPUT_BYTES, BadInput, Discovery, InputItem
from m3i.shard.sources import add_class_folders, add_unlabelled
from m3i.shard.tars import discover_tars
from m3i.storage import Store

__all__ = ["PLAN_FIELDS", "Plan", "Unit", "discover", "make_plan", "split_eval"]

# The settings that change a shard's bytes; the others (out, workers, ...) leave every unit as it is.
PLAN_FIELDS = ("max_samples_per_shard", "max_bytes_per_shard", "resize", "reencode", "jpeg_quality", "seed")


def discover(
    labelled: tuple[str, ...] = (),
    captions: tuple[str, ...] = (),
    unlabelled: tuple[str, ...] = (),
    eval_labelled: tuple[str, ...] = (),
    webdataset: tuple[str, ...] = (),
    *,
    allow_outside_paths: bool = False,
    scan_cache: Store | None = None,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> Discovery:
    """List every input of every source.

    Args:
        labelled: Folders of class sub-folders (train split).
        captions: JSONL or CSV files of image path and caption.
        unlabelled: Folders of images.
        eval_labelled: Folders of class sub-folders for the held-out ``eval`` split.
        webdataset: Existing WebDataset tars: local paths or ``s3://`` URLs, brace patterns allowed.
        allow_outside_paths: Let caption files name images outside their own folder.
        scan_cache: A store where tar listings are cached (``m3i.shard.tars.scan``), or None.
        max_input_bytes: Inputs larger than this are bad inputs (``shard.max_input_bytes``).

    Returns:
        The items (deduplicated by (source, id)), the bad inputs, and the sorted class names.

    Raises:
        ValueError: When a named folder or file does not exist or has the wrong layout, or
            when no input is given at all.
    """
    if not (labelled or captions or unlabelled or eval_labelled or webdataset):
        raise ValueError(
            "shard: no inputs; set at least one of shard.labelled, shard.captions, shard.unlabelled, shard.webdataset"
        )
    items: list[InputItem] = []
    bad: list[BadInput] = []
    classes: set[str] = set()
    for root in labelled:
        classes |= add_class_folders("labelled", root, "train", items, bad, max_input_bytes)
    for root in eval_labelled:
        classes |= add_class_folders("eval_labelled", root, "eval", items, bad, max_input_bytes)
    for root in captions:
        add_captions(root, items, bad, allow_outside_paths, max_input_bytes)
    for root in unlabelled:
        add_unlabelled(root, items, bad, max_input_bytes)
    if webdataset:
        classes |= discover_tars(webdataset, items, bad, scan_cache, max_input_bytes)
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for it in items:
        k = (it.split, it.source, it.id)
        if k in seen:
            bad.append(BadInput(it.source, it.id, "duplicate input"))
            continue
        seen.add(k)
        unique.append(it)
    return Discovery(unique, bad, sorted(classes))


def _order_key(seed: int, item: InputItem) -> str:
    return hashlib.sha256(f"{seed}/{item.split}/{item.source}/{item.id}".encode()).hexdigest()


def split_eval(items: list[InputItem], cfg: ShardConfig) -> list[InputItem]:
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


def _cut_units(cfg: ShardConfig, items: list[InputItem]) -> list[tuple[str, int, list[InputItem]]]:
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


def _unit_hash(plan_sha256: str, items: list[InputItem]) -> str:
    h = hashlib.sha256(plan_sha256.encode())
    for it in items:
        h.update(f"{it.source}\t{it.id}\t{it.path}\t{it.split}\t{it.label}\t{it.caption}\t{it.size}".encode())
        if it.member is not None:
            h.update(f"\t{it.member}\t{it.version}".encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Unit:
    """One unit of work: the inputs that become one or more shards ``<split>-<number>-<part>-<sha>.tar``."""

    split: str
    """``train`` or ``eval``."""
    number: int
    """The unit's number within its split."""
    items: list[InputItem]
    """Its inputs, in the order they are written."""
    unit_hash: str
    """Hash of the plan's settings and every item; a re-run reuses the unit while it matches."""


@dataclass(frozen=True)
class Plan:
    """Everything a run writes, decided before a byte of an image is read."""

    found: Discovery
    """The listing of every input (before the eval split)."""
    items: list[InputItem]
    """The items to shard, after the eval split."""
    settings: dict[str, Any]
    """The whole ``shard`` config section as a dict (the index records it)."""
    plan_sha256: str
    """Hash of the index format, the settings in :data:`PLAN_FIELDS` and the class names."""
    units: list[Unit]
    """Every unit, train before eval."""


def make_plan(cfg: ShardConfig, scan_cache: Store | None) -> Plan:
    """List the inputs named in ``cfg`` and cut them into units.

    Args:
        cfg: The ``shard`` config section.
        scan_cache: Where tar listings are cached (the output store), or None.

    Raises:
        ValueError: A named input folder or file does not exist or has the wrong layout.
    """
    found = discover(
        cfg.labelled, cfg.captions, cfg.unlabelled, cfg.eval_labelled, cfg.webdataset,
        allow_outside_paths=cfg.allow_outside_paths, scan_cache=scan_cache, max_input_bytes=cfg.max_input_bytes,
    )
    items = split_eval(found.items, cfg)
    settings = to_dict(cfg)
    plan_fields = {k: settings[k] for k in PLAN_FIELDS}
    plan_sha256 = hashlib.sha256(json.dumps([FORMAT_VERSION, plan_fields, found.classes], sort_keys=True).encode()).hexdigest()
    units = [Unit(split, n, its, _unit_hash(plan_sha256, its)) for split, n, its in _cut_units(cfg, items)]
    return Plan(found, items, settings, plan_sha256, units)
