"""Training metrics: one Prometheus registry per rank, served on ``/metrics`` and pushed at the end.

    metrics = build_metrics(cfg.metrics, rank=rank, local_rank=local_rank, run_id=run_id,
                            world_size=world_size, model=cfg.model.name)
    for ...:
        metrics.on_step(StepReport(step=step, steps=total, parts=parts, lr=lr, samples=n,
                                   seconds=dt, data_wait_seconds=wait, time=time.time()))
    metrics.close()
    metrics.push_summary({"final_loss": loss, "steps": step})

One job per module:

* :mod:`m3i.metrics.names`: the one table of names (training, its pushed summary, promotion);
* :mod:`m3i.metrics.report`: :class:`StepReport`, one optimizer step as every output sees it;
* :mod:`m3i.metrics.processor`: what computes (rates, MFU, data-count deltas, the cadence);
* :mod:`m3i.metrics.series`: the registry that holds a rank's series;
* :mod:`m3i.metrics.endpoint`: what serves (``/metrics``, never from a forked worker);
* :mod:`m3i.metrics.push`: what pushes (the summary, to a Pushgateway);
* :mod:`m3i.metrics.rank`: :class:`TrainMetrics`, the four put together as one output of the loop.

Each rank serves its own registry on ``metrics.port + local_rank`` (so the ranks on one node do
not clash) and every series carries ``rank`` and ``run_id`` labels; sum or average over ``rank``
in PromQL for the run as a whole.

Processes: build :class:`TrainMetrics` in the rank's main process and update it only there.
Workers do not touch metrics (failure counts reach the main process through the loader's shared
counters, carried by each :class:`StepReport`), so prometheus_client's multiprocess mode is
neither needed nor used.
"""

from m3i.metrics.endpoint import MetricsEndpoint
from m3i.metrics.names import BRANCHES, METRIC_NAMES, PROMOTE_METRIC_NAMES, PROMOTE_SPECS, SUMMARY_METRIC, TRAIN_SPECS
from m3i.metrics.processor import MetricsProcessor, Update
from m3i.metrics.push import push_summary
from m3i.metrics.rank import TrainMetrics, build_metrics
from m3i.metrics.report import StepReport
from m3i.metrics.series import TrainSeries

__all__ = [
    "BRANCHES",
    "METRIC_NAMES",
    "PROMOTE_METRIC_NAMES",
    "PROMOTE_SPECS",
    "SUMMARY_METRIC",
    "TRAIN_SPECS",
    "MetricsEndpoint",
    "MetricsProcessor",
    "StepReport",
    "TrainMetrics",
    "TrainSeries",
    "Update",
    "build_metrics",
    "push_summary",
]
