"""A rank's training series: a private Prometheus registry holding every family of the names table.

It registers and stores; :class:`~m3i.metrics.processor.MetricsProcessor` computes what goes in,
:class:`~m3i.metrics.endpoint.MetricsEndpoint` serves it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from m3i.metrics.names import BASE_LABELS, BRANCHES, TRAIN_SPECS
from m3i.metrics.processor import Update

__all__ = ["TrainSeries"]

_TYPES = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}


class TrainSeries:
    """Every family of :data:`~m3i.metrics.names.TRAIN_SPECS` in a registry of its own, labelled ``rank`` and ``run_id``.

    Counters and histograms without extra labels, and the per-branch sample counters, exist at
    0 from the start so ``rate()`` and ``increase()`` see the first increment.

    Args:
        rank: Global rank (label ``rank``).
        run_id: Id of the run (label ``run_id``).
    """

    def __init__(self, rank: int, run_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"rank": str(rank), "run_id": run_id}
        self._families: dict[str, Any] = {}
        for name, (kind, doc, extra, buckets) in TRAIN_SPECS.items():
            kw: dict[str, Any] = {"buckets": buckets} if buckets else {}
            self._families[name] = _TYPES[kind](name, doc, labelnames=BASE_LABELS + extra, registry=self.registry, **kw)
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        for name, (kind, _, extra, _) in TRAIN_SPECS.items():
            if kind != "gauge" and not extra:
                self.child(name)
        for branch in BRANCHES:
            self.child("m3i_train_branch_samples_total", branch=branch)

    def child(self, name: str, **extra: str) -> Any:
        """The series ``name`` with this rank's labels and ``extra`` (created on first use)."""
        key = (name, tuple(sorted(extra.items())))
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = self._families[name].labels(**self._labels, **extra)
        return found

    def apply(self, update: Update) -> None:
        """Apply a processor's update: increments, observations, then gauge values."""
        for name, value, labels in update.inc:
            self.child(name, **labels).inc(value)
        for name, value in update.observe:
            self.child(name).observe(value)
        for name, value, labels in update.set:
            self.child(name, **labels).set(value)
