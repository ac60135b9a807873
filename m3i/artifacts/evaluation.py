"""An evaluation's results: a model's scores as ``metrics.json`` holds them, and the fingerprint of the eval set.

    ev = read_evaluation("s3://m3i/evals/run-7")          # or a metrics.json dict of m3i evaluate
    ev.scores["probe.top1"], ev.random_init["probe.top1"]  # fractions in [0, 1]
    ev.eval_set.fingerprint                                # equal fingerprints: comparable scores

Two scores are comparable only when they were measured on the same labelled samples with the same
scoring settings: the fingerprint covers the classes and every shard's sha256 of the two splits
(``data.content_sha256``, which ``m3i evaluate`` records), the split names, and the kNN / probe
(/ fine-tune) settings ``metrics.json`` records.

Layout under ``evaluate.out`` (written by :func:`m3i.evaluate.evaluate`, ``metrics.json`` last)::

    metrics.json            every score, the model and the data set scored (what this module reads)
    kfp_metrics.json, confusion_matrix.json, report.md, confusion.png, loss_curves.png
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from m3i.artifacts.dataset import content_sha256, read_index
from m3i.config.promote import SCORES
from m3i.storage import StorageError, join_uri, open_store

__all__ = ["METRICS_FILE", "EvalSet", "Evaluation", "evaluation_from_metrics", "flatten_scores", "read_evaluation"]

METRICS_FILE = "metrics.json"
"""What ``m3i evaluate`` writes last under ``evaluate.out``."""

_PROTOCOL = {"knn": ("k", "temperature"), "probe": ("epochs", "lr", "weight_decay"), "finetune": ("steps", "lr", "batch_size")}
"""The settings of each method that ``metrics.json`` records beside its scores."""


@dataclass(frozen=True)
class EvalSet:
    """The labelled data and scoring settings a model's scores were measured with."""

    shards: str
    """The data set (``data.shards``) as ``metrics.json`` names it."""
    content_sha256: str
    """:func:`m3i.artifacts.dataset.content_sha256` of the two splits: the classes and every shard's
    sha256, so the same images sharded again (a new ``index.json`` run record) are the same eval set."""
    train_split: str
    eval_split: str
    protocol: dict[str, Any] = field(default_factory=dict)
    """``{"knn.k": 20, "probe.epochs": 100, ...}``: the scoring settings."""

    @property
    def fingerprint(self) -> str:
        """sha256 of everything above but ``shards`` (the same data copied elsewhere scores the same)."""
        doc = {"content_sha256": self.content_sha256, "splits": [self.train_split, self.eval_split], "protocol": self.protocol}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards, "content_sha256": self.content_sha256, "train_split": self.train_split,
            "eval_split": self.eval_split, "protocol": dict(self.protocol), "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "EvalSet":
        return cls(str(raw["shards"]), str(raw["content_sha256"]), str(raw["train_split"]), str(raw["eval_split"]), dict(raw.get("protocol") or {}))


@dataclass(frozen=True)
class Evaluation:
    """A model's scores on one eval set."""

    scores: dict[str, float]
    """``{"knn.top1": 0.81, "probe.top1": 0.77, ..., "feature_std.eval": 0.6}``."""
    random_init: dict[str, float]
    """The same architecture at random init: ``{"knn.top1": 0.2, ...}``; empty when not measured."""
    eval_set: EvalSet
    source: str = ""
    """Where the scores were read (a ``metrics.json`` URI), empty for a dict handed in."""
    model: str = ""
    """The model scored, as ``metrics.json`` names it (``model.uri``); empty when it names none."""


def flatten_scores(block: Mapping[str, Any]) -> dict[str, float]:
    """The known scores (:data:`m3i.config.promote.SCORES`) present in a ``metrics.json`` block."""
    out: dict[str, float] = {}
    for name in SCORES:
        method, metric = name.split(".")
        value = (block.get(method) or {}).get(metric) if isinstance(block.get(method), Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _content_sha256(data: Mapping[str, Any], where: str) -> str:
    """What ``m3i evaluate`` recorded it scored on; for a ``metrics.json`` written before it recorded
    that, the same digest of the data set's index as it is now."""
    recorded = data.get("content_sha256")
    if isinstance(recorded, str) and recorded:
        return recorded
    shards = data.get("shards")
    try:
        index = read_index(open_store(str(shards)))
        return content_sha256(index, [str(data.get("train_split", "train")), str(data.get("eval_split", "eval"))])
    except (StorageError, ValueError) as e:
        raise ValueError(
            f"{where}: cannot fingerprint the eval data set {shards!r} ({e}); scores on a data set that cannot be "
            "read cannot be compared with the champion's"
        ) from None


def evaluation_from_metrics(metrics: Mapping[str, Any], *, source: str = "") -> Evaluation:
    """The scores and eval set of a ``metrics.json`` of ``m3i evaluate``.

    Raises:
        ValueError: When it holds no score (not an evaluation, or an empty one) or names no data set.
    """
    where = source or "the evaluation"
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where} is a JSON {type(metrics).__name__}; expected the object m3i evaluate writes to {METRICS_FILE}")
    scores = flatten_scores(metrics)
    if not scores:
        raise ValueError(
            f"{where} holds no scores (none of {list(SCORES)}); give the {METRICS_FILE} that `m3i evaluate` wrote for the candidate"
        )
    data = metrics.get("data")
    if not isinstance(data, Mapping) or not data.get("shards"):
        raise ValueError(f"{where} names no eval data set (data.shards); its scores cannot be compared with another model's")
    protocol = {
        f"{method}.{key}": metrics[method][key]
        for method, keys in _PROTOCOL.items()
        if isinstance(metrics.get(method), Mapping)
        for key in keys
        if key in metrics[method]
    }
    eval_set = EvalSet(str(data["shards"]), _content_sha256(data, where), str(data.get("train_split", "train")),
                       str(data.get("eval_split", "eval")), protocol)
    base = metrics.get("random_init")
    model = metrics.get("model")
    return Evaluation(scores, flatten_scores(base) if isinstance(base, Mapping) else {}, eval_set, source,
                      str(model.get("uri") or "") if isinstance(model, Mapping) else "")


def read_evaluation(metrics: Mapping[str, Any] | str) -> Evaluation:
    """:func:`evaluation_from_metrics` of a dict, or of the ``metrics.json`` at a URI (the file, or the
    ``evaluate.out`` folder holding it).

    Raises:
        ValueError: When there is no ``metrics.json`` there, or it holds no scores.
    """
    if not isinstance(metrics, str):
        return evaluation_from_metrics(metrics)
    uri = metrics if metrics.rstrip("/").endswith(".json") else join_uri(metrics, METRICS_FILE)
    parent, _, key = uri.rstrip("/").rpartition("/")
    store = open_store(parent or ".")
    if not store.exists(key):
        raise ValueError(f"the candidate's scores {uri!r} do not exist; run `m3i evaluate` on the candidate first")
    try:
        doc = store.read_json(key)
    except StorageError as e:
        raise ValueError(f"the candidate's scores {uri!r} are not readable: {e}") from None
    return evaluation_from_metrics(doc, source=store.url(key))
