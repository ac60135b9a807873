"""The ablation's per-attribute labelled data sets of a demo root, and frozen-feature scores on them.

    sets = build_attribute_sets("m3i-data/abl/raw", "m3i-data/ablation/data/attributes", ["shape", "colour"], cfg.shard)
    scores = score_on_attributes(encoder, sets, cfg.evaluate)   # {"shape": {"knn": ..., "probe": ...}, ...}

A demo root (``m3i demo-data``) describes every image of every source in ``attributes.jsonl``, one
JSON object a line::

    {"image": "eval/circle/000001.png", "source": "eval", "shape": "circle", "colour": "red", ...}

For one attribute, the labelled source's images become the ``train`` split (kNN memory bank and
probe data) and the ``eval`` images the held-out split, each in class folders named by the
attribute's value. The folders hold symbolic links into the root, so no pixel is copied; the
trees are sharded with :func:`m3i.shard.shard` like any other labelled data set::

    <out>/<attribute>/images/train/<value>/<source>_<class>_<id>.png   -> <root>/labelled/<class>/<id>.png
    <out>/<attribute>/images/eval/<value>/...                          -> <root>/eval/<class>/<id>.png
    <out>/<attribute>/shards/index.json, train/*.tar, eval/*.tar
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from m3i.config import EvaluateConfig, ShardConfig, with_values
from m3i.config.data import input_values

if TYPE_CHECKING:
    from m3i.artifacts import ShardIndex
    from m3i.models.pretrained import Encoder

__all__ = ["ATTRIBUTES_FILE", "SOURCES", "attributes_sha256", "build_attribute_sets", "read_attributes", "score_on_attributes"]

log = logging.getLogger(__name__)

ATTRIBUTES_FILE = "attributes.jsonl"
"""The file of a demo root that describes each image."""
SOURCES = ("labelled", "captioned", "unlabelled", "eval")
"""Values of a row's ``source``."""
_TRAIN, _EVAL = "labelled", "eval"
"""The sources whose images form an attribute's ``train`` and ``eval`` splits."""


def read_attributes(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``<root>/attributes.jsonl``.

    Raises:
        ValueError: When the file is missing, a line is not a JSON object, or a row lacks
            ``image`` or has a ``source`` outside :data:`SOURCES`.
    """
    path = Path(root) / ATTRIBUTES_FILE
    if not path.is_file():
        raise ValueError(f"--demo-root {str(root)!r} has no {ATTRIBUTES_FILE}; write it with `m3i demo-data`")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or row.get("source") not in SOURCES:
            raise ValueError(f"{path}:{n} needs an 'image' path and a 'source' in {list(SOURCES)}; got {line[:120]!r}")
        rows.append(row)
    return rows


def attributes_sha256(root: str | os.PathLike) -> str:
    """SHA-256 of ``<root>/attributes.jsonl`` (names the data in the ablation's settings)."""
    with open(Path(root) / ATTRIBUTES_FILE, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_attribute(rows: list[dict[str, Any]], attribute: str) -> None:
    known = sorted({k for r in rows for k in r} - {"image", "source"})
    for source in (_TRAIN, _EVAL):
        mine = [r for r in rows if r["source"] == source]
        missing = [r["image"] for r in mine if attribute not in r]
        if missing:
            raise ValueError(f"attribute {attribute!r} is missing for {missing[0]} ({len(missing)} rows); choose from {known}")
        values = {str(r[attribute]) for r in mine}
        if len(values) < 2:
            raise ValueError(f"attribute {attribute!r} has {len(values)} value(s) among the {source} images; scoring needs at least 2")
        bad = sorted(v for v in values if not v or "/" in v or v.startswith("."))
        if bad:
            raise ValueError(f"attribute {attribute!r} has value {bad[0]!r}, which cannot name a class folder")


def _link_tree(rows: list[dict[str, Any]], root: Path, attribute: str, tree: Path) -> None:
    """Class folders of hard links: ``tree/{train,eval}/<value>/<flattened image path>``."""
    if tree.exists():
        shutil.rmtree(tree)
    for source, split in ((_TRAIN, "train"), (_EVAL, "eval")):
        for r in rows:
            if r["source"] != source:
                continue
            target = (root / r["image"]).resolve()
            if not target.is_file():
                raise ValueError(f"{root / ATTRIBUTES_FILE} lists {r['image']!r}, which is not a file under {root}")
            link = tree / split / str(r[attribute]) / "_".join(Path(r["image"]).parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            # Hard links (a copy across file systems): `m3i shard` skips symlinks that lead out of
            # their input folder, and these would all lead to the demo root.
            try:
                os.link(target, link)
            except OSError:
                shutil.copyfile(target, link)


def build_attribute_sets(
    root: str | os.PathLike, out: str | os.PathLike, attributes: Sequence[str], shard_cfg: ShardConfig
) -> dict[str, str]:
    """Build and shard one labelled data set per attribute; returns ``{attribute: shards folder}``.

    Idempotent and cheap to repeat: :func:`m3i.shard.shard` reuses every unit whose inputs did not
    change. A lock in ``out`` keeps ablations that share the folder from building it at once.

    Args:
        root: A demo root with ``attributes.jsonl``.
        out: Folder of the per-attribute trees and shards.
        attributes: Keys of the rows to build data sets for.
        shard_cfg: Encoding settings (shard size, workers, JPEG quality); its inputs and ``out`` are replaced.

    Raises:
        ValueError: On a missing file, an unknown attribute, or one with fewer than 2 values in a split.
    """
    from m3i.shard import shard

    root, out = Path(root).resolve(), Path(out)
    rows = read_attributes(root)
    for a in attributes:
        _check_attribute(rows, a)
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for a in attributes:
            tree = out / a / "images"
            _link_tree(rows, root, a, tree)
            inputs = input_values({"labelled": [str(tree / "train")], "eval_labelled": [str(tree / "eval")]})
            cfg = with_values(shard_cfg, {**inputs, "shard.out": str(out / a / "shards"), "shard.eval_fraction": 0.0})
            index = shard(cfg, progress=False)
            log.info("attribute %s: %d classes %s, shards in %s", a, index.num_classes, index.classes, cfg.out)
            sets[a] = cfg.out
    return sets


def score_on_attributes(encoder: Encoder, sets: dict[str, ShardIndex], cfg: EvaluateConfig) -> dict[str, dict[str, Any]]:
    """kNN and linear-probe scores of an encoder's frozen features on each attribute's data set.

    Args:
        encoder: From :func:`m3i.models.pretrained.load_encoder` (a checkpoint) or built by hand.
        sets: ``{attribute: index}`` of the data sets (:func:`m3i.evaluate.read_split_index`).
        cfg: Splits, kNN and probe settings.

    Returns:
        ``{attribute: {"knn_top1", "probe_top1", "feature_std", "classes"}}``, accuracies as fractions,
        ``feature_std`` of the eval split's features (top-5 says nothing with a handful of classes).
    """
    from m3i.evaluate import eval_transform, extract_features, score_features

    transform = eval_transform(encoder)
    kw = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
    out = {}
    for a, index in sets.items():
        train = extract_features(encoder.module, index, cfg.train_split, transform, **kw)
        test = extract_features(encoder.module, index, cfg.eval_split, transform, **kw)
        s = score_features(train, test, index.classes, cfg)
        out[a] = {
            "knn_top1": s["knn"]["top1"], "probe_top1": s["probe"]["top1"], "feature_std": s["feature_std"]["eval"],
            "classes": len(index.classes),
        }
    return out
