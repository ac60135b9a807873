"""Builders for the promotion tests: tiny real exports, ``metrics.json`` documents, an eval data set.

The exports are real (``m3i export`` of a ZeRO-0 checkpoint laid out as tests/test_export.py lays it out);
the scores are written by hand, so that a test chooses which candidate is better.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from m3i.config import load_config
from m3i.storage import join_uri, open_store
from tests.helpers import write_train_config
from tests.test_export import _fake_zero0_checkpoint


def make_export(root: Path, models_uri: str, name: str, step: int):
    """A real ``m3i export`` of a tiny model whose weights depend on ``step`` (so does its version)."""
    from m3i.export import export
    from m3i.models import build_model

    cfg_file = write_train_config(root / f"train-{step}.yaml", "unused", "unused")
    cfg = load_config(None, cfg_file)
    torch.manual_seed(step)
    model = build_model(cfg, num_classes=4)
    run = root / f"run-{step}"
    _fake_zero0_checkpoint(run, cfg, model, step=step)
    return export(load_config(None, cfg_file, [f"export.checkpoint={run}", f"export.out={models_uri}", f"export.name={name}"]))


def fake_dataset(uri: str, tag: str = "a") -> str:
    """A data set root whose ``index.json`` fingerprints it (its content differs per ``tag``)."""
    def split(name: str) -> dict[str, Any]:
        sha = hashlib.sha256(f"{tag}/{name}".encode()).hexdigest()
        return {"shards": [{"key": f"{name}/{name}-00000-00-{sha[:12]}.tar", "samples": 1, "bytes": 1, "sha256": sha, "sources": {}}]}

    index = {"format": "m3i-shards", "format_version": 1, "classes": ["a", "b"], "splits": {s: split(s) for s in ("train", "eval")}}
    open_store(uri).write_json("index.json", index)
    return uri


def _block(top1: float, **extra: Any) -> dict[str, Any]:
    return {"top1": top1, "top5": min(1.0, top1 + 0.2), "mean_class_top1": top1, **extra}


def metrics_doc(model_uri: str, shards: str, probe: float, knn: float, *, base: float = 0.2, feature_std: float = 0.5) -> dict[str, Any]:
    """A ``metrics.json`` as ``m3i evaluate`` writes it, with the fields the gate reads and the scores given."""
    return {
        "model": {"uri": model_uri, "kind": "exported", "name": "m", "step": 1},
        "data": {"shards": shards, "train_split": "train", "eval_split": "eval"},
        "knn": _block(knn, k=20, temperature=0.07),
        "probe": _block(probe, epochs=100, lr=0.01, weight_decay=1e-4),
        "feature_std": {"train": feature_std, "eval": feature_std},
        "random_init": {"knn": _block(base), "probe": _block(base), "feature_std": {"train": 0.9, "eval": 0.9}},
    }


def write_metrics(uri: str, doc: dict[str, Any]) -> str:
    """``doc`` as ``<uri>/metrics.json``; returns ``uri``."""
    open_store(uri).write_json("metrics.json", doc)
    return uri


def promote_cfg(*overrides: str):
    """The default config with ``promote.*`` overrides."""
    return load_config(None, None, list(overrides))


def pointer_bytes(models_uri: str, name: str) -> bytes | None:
    store = open_store(join_uri(models_uri, name))
    return store.get_bytes("champion.json") if store.exists("champion.json") else None


def log_seqs(models_uri: str, name: str) -> list[int]:
    from m3i.promote import Ledger

    return Ledger(models_uri, name).seqs()

