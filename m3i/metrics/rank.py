"""One training rank's metrics: the parts put together (processor, series, endpoint, push) as one output of the loop."""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry

import m3i
from m3i.config.metrics import MetricsConfig
from m3i.metrics.endpoint import MetricsEndpoint, check_port
from m3i.metrics.processor import MetricsProcessor, Update
from m3i.metrics.push import push_summary
from m3i.metrics.report import StepReport
from m3i.metrics.series import TrainSeries

__all__ = ["TrainMetrics", "build_metrics"]


class TrainMetrics:
    """A rank's training metrics: what each event changes (:class:`MetricsProcessor`), the registry that
    holds it (:class:`TrainSeries`), its ``/metrics`` endpoint (:class:`MetricsEndpoint`, unless
    ``metrics.port`` is 0) and the final push (:func:`push_summary`).

    Build it with :func:`build_metrics` in the rank's main process and update it only there. Its
    methods are cheap and thread-safe; recording still works after :meth:`close`.
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        *,
        rank: int,
        local_rank: int,
        run_id: str,
        world_size: int = 1,
        model: str = "",
        peak_flops: float | None = None,
    ) -> None:
        """See :func:`build_metrics`."""
        if rank < 0 or local_rank < 0:
            raise ValueError(f"rank={rank}, local_rank={local_rank}: ranks must be >= 0")
        if not run_id:
            raise ValueError("run_id='' is not allowed; give the run's id (it labels every series)")
        check_port(cfg, local_rank)
        self.cfg, self.rank, self.local_rank, self.run_id = cfg, rank, local_rank, run_id
        self.processor = MetricsProcessor(cfg.interval_steps, peak_flops)
        self.series = TrainSeries(rank, run_id)
        self.series.child("m3i_train_info", version=m3i.__version__, world_size=str(world_size), model=model).set(1)
        self.endpoint = MetricsEndpoint(self.series.registry, cfg, rank=rank, local_rank=local_rank) if cfg.port else None

    @property
    def registry(self) -> CollectorRegistry:
        """The rank's registry (what the endpoint serves)."""
        return self.series.registry

    @property
    def port(self) -> int | None:
        """The endpoint's port, or ``None`` when it is off or closed."""
        return self.endpoint.port if self.endpoint is not None else None

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` of the endpoint, or ``None`` when it is off or closed."""
        return self.endpoint.url if self.endpoint is not None else None

    def should_record(self, step: int) -> bool:
        """Whether ``step``'s gauges are recorded (every ``metrics.interval_steps``)."""
        return self.processor.should_record(step)

    def on_step(self, report: StepReport) -> None:
        """Record a finished step and the loader's failure totals it carries (see :meth:`MetricsProcessor.step`)."""
        self.series.apply(self.processor.step(report))
        if report.data_stats:
            self.on_data_stats(report.data_stats)

    def on_data_stats(self, stats: Mapping[str, int]) -> None:
        """Feed the loader's cumulative failure counts (``ShardLoader.stats()``; see :meth:`MetricsProcessor.data_stats`)."""
        self.series.apply(self.processor.data_stats(stats))

    def on_skipped_step(self) -> None:
        """Count a step whose update was skipped for a NaN/inf loss."""
        self.series.child("m3i_train_skipped_steps_total").inc()

    def on_overflow_step(self) -> None:
        """Count an optimizer step DeepSpeed skipped for overflowing gradients (the loop retries it)."""
        self.series.child("m3i_train_overflow_steps_total").inc()

    def on_checkpoint(self, seconds: float, ok: bool) -> None:
        """Record a checkpoint save that took ``seconds``; ``ok=False`` counts a failure."""
        up = Update(observe=[("m3i_train_checkpoint_seconds", max(seconds, 0.0))])
        if not ok:
            up.add("m3i_train_checkpoint_failures_total", 1)
        self.series.apply(up)

    def push_summary(self, summary: Mapping[str, float], *, timeout: float = 10.0) -> bool:
        """Push the run's summary to ``metrics.pushgateway`` (see :func:`m3i.metrics.push.push_summary`)."""
        return push_summary(self.cfg, self.run_id, self.rank, summary, timeout=timeout)

    def close(self) -> None:
        """Stop the endpoint and free its port. Safe to call twice."""
        if self.endpoint is not None:
            self.endpoint.close()

    def __enter__(self) -> TrainMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_metrics(
    cfg: MetricsConfig,
    rank: int,
    local_rank: int,
    run_id: str,
    *,
    world_size: int = 1,
    model: str = "",
    peak_flops: float | None = None,
) -> TrainMetrics:
    """Build a rank's metrics and start its ``/metrics`` endpoint (unless ``cfg.port`` is 0).

    Call it in the rank's main process before the DataLoader forks its workers.

    Args:
        cfg: The ``metrics`` section.
        rank: Global rank (label ``rank``).
        local_rank: Rank on this node; the endpoint listens on ``cfg.port + local_rank``.
        run_id: Id of the run (label ``run_id``, and the Pushgateway grouping key).
        world_size: Number of ranks (label of ``m3i_train_info``).
        model: Model name (label of ``m3i_train_info``).
        peak_flops: Dense peak FLOP/s of the rank's device for the run's precision
            (:func:`m3i.models.flops.peak_flops`); ``None`` leaves ``m3i_train_mfu_ratio`` unset.

    Returns:
        The rank's :class:`TrainMetrics`; close it at the end of training.

    Raises:
        ValueError: On a negative rank, an empty ``run_id`` or ``port + local_rank`` above 65535.
        OSError: When the endpoint's port cannot be bound (the message names the port).
    """
    return TrainMetrics(cfg, rank=rank, local_rank=local_rank, run_id=run_id, world_size=world_size, model=model, peak_flops=peak_flops)
