"""The run's summary pushed to a Prometheus Pushgateway at the end of training (``metrics.pushgateway``)."""

from __future__ import annotations

import logging
from typing import Mapping

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from m3i.config.metrics import MetricsConfig
from m3i.metrics.names import SUMMARY_METRIC

__all__ = ["push_summary"]

log = logging.getLogger(__name__)


def push_summary(cfg: MetricsConfig, run_id: str, rank: int, summary: Mapping[str, float], *, timeout: float = 10.0) -> bool:
    """Push a rank's run summary to ``cfg.pushgateway``; a no-op when that is empty.

    The push carries one gauge, ``m3i_train_summary{name=<key>}``, in a registry of its own,
    under job ``cfg.job`` and grouping key ``run_id`` + ``rank`` (so ranks and runs do not
    overwrite each other; the gateway adds those as labels). A failed push is logged as a
    warning and never raised: the run is done and its checkpoints are what matter.

    Args:
        cfg: The ``metrics`` section.
        run_id: Id of the run (grouping key).
        rank: Global rank (grouping key).
        summary: Name -> value, e.g. ``{"final_loss": 1.7, "steps": 10000, "wall_seconds": 3600}``.
        timeout: Seconds to wait for the gateway.

    Returns:
        ``True`` when the gateway accepted the push.
    """
    if not cfg.pushgateway:
        return False
    registry = CollectorRegistry(auto_describe=True)
    gauge = Gauge(SUMMARY_METRIC, "Final summary of a training run, one series per entry.", labelnames=("name",), registry=registry)
    try:
        for key, value in summary.items():
            gauge.labels(name=str(key)).set(float(value))
        push_to_gateway(cfg.pushgateway, job=cfg.job, registry=registry, grouping_key={"run_id": run_id, "rank": str(rank)}, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure of the push must not fail the run
        log.warning("rank %d: pushing the summary to %s failed: %s", rank, cfg.pushgateway, e)
        return False
    return True
