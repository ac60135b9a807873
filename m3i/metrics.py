"""Training metrics: one Prometheus registry per rank, served on ``/metrics`` and pushed at the end.

    metrics = build_metrics(cfg.metrics, rank=rank, local_rank=local_rank, run_id=run_id,
                            world_size=world_size, model=cfg.model.name)
    for step, batch in ...:
        metrics.on_step(step, parts, lr=lr, samples=n, step_seconds=dt, data_wait_seconds=wait)
    metrics.push_summary({"final_loss": loss, "steps": step})
    metrics.close()

Each rank serves its own registry on ``metrics.port + local_rank`` (so the ranks on one node do
not clash) and every series carries ``rank`` and ``run_id`` labels; sum or average over ``rank``
in PromQL for the run as a whole.

Processes: build :class:`TrainMetrics` in the rank's main process and update it only there. The
endpoint is a daemon thread of that process. DataLoader workers forked later inherit neither
the thread (``fork`` copies only the calling thread) nor, thanks to an at-fork hook, the
listening socket, so they serve nothing and never keep the port bound after :meth:`close`.
Workers do not touch metrics (failure counts reach the main process through the loader's
shared counters, see :meth:`TrainMetrics.on_data_stats`), so prometheus_client's multiprocess
mode is neither needed nor used.

Names follow Prometheus conventions: ``m3i_`` prefix, base units, unit suffixes. Counters are
listed by the name PromQL sees (``m3i_train_steps_total``); histograms by their family name
(query ``m3i_train_step_seconds_bucket``, ``_sum`` and ``_count``). prometheus_client adds a
``_created`` series to each counter and histogram; those are its own and not listed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

import m3i
from m3i.config.metrics import MetricsConfig

__all__ = ["METRIC_NAMES", "PROMOTE_METRIC_NAMES", "PROMOTE_SPECS", "SUMMARY_METRIC", "TrainMetrics", "build_metrics"]

log = logging.getLogger(__name__)

BRANCHES = ("img", "cls", "txt")
GPU_MEMORY_KINDS = ("allocated", "reserved", "max_allocated")

# Step time spans ~10 ms (tiny CPU runs) to minutes (huge models, slow storage).
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# Keys of the loader's cumulative ``stats()`` -> the counter each one feeds.
_DATA_COUNTERS = {
    "shards_failed": "m3i_train_data_shards_failed_total",
    "samples_failed": "m3i_train_data_samples_failed_total",
    "samples_padded": "m3i_train_data_samples_padded_total",
}

# name -> (type, help, labels beyond rank/run_id, histogram buckets). The one place a name is spelt.
_SPECS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "m3i_train_info": ("gauge", "Constant 1; labels describe the run (version, world_size, model).",
                       ("version", "world_size", "model"), None),
    "m3i_train_loss": ("gauge", "Last recorded loss, by part (loss is the weighted total).", ("part",), None),
    "m3i_train_lr": ("gauge", "Learning rate of the last recorded step.", (), None),
    "m3i_train_ema_momentum": ("gauge", "EMA momentum of the target encoder at the last recorded step.", (), None),
    "m3i_train_temperature": ("gauge", "Softmax temperature of the image-text loss at the last recorded step.",
                              (), None),
    "m3i_train_target_std": ("gauge", "Std of the EMA target features over the batch (near 0 means collapse).",
                             (), None),
    "m3i_train_samples_total": ("counter", "Samples this rank trained on.", (), None),
    "m3i_train_steps_total": ("counter", "Finished training steps, skipped ones included.", (), None),
    "m3i_train_skipped_steps_total": ("counter", "Steps whose update was skipped for a NaN/inf loss.", (), None),
    "m3i_train_overflow_steps_total": ("counter", "Optimizer steps DeepSpeed skipped for overflowing gradients and "
                                       "retried (fp16 loss scaling: routine while the scale settles; inf/NaN "
                                       "gradients in bf16).", (), None),
    "m3i_train_samples_per_second": ("gauge", "Samples per second of this rank since the previous recorded step.",
                                     (), None),
    "m3i_train_model_flops_per_second": ("gauge", "Model FLOPs per second of this rank since the previous recorded "
                                         "step (matmul, convolution and attention FLOPs torch counted on the first "
                                         "micro-batch, forward and backward).", (), None),
    "m3i_train_mfu_ratio": ("gauge", "Model FLOPs utilisation of this rank: m3i_train_model_flops_per_second over the "
                            "device's dense peak for the run's precision (set only for GPUs in m3i.models.flops.PEAK_FLOPS).",
                            (), None),
    "m3i_train_step_seconds": ("histogram", "Wall time of a training step, data wait included.", (),
                               _STEP_BUCKETS),
    "m3i_train_data_wait_seconds": ("histogram", "Time a step waited for its batch.", (), _WAIT_BUCKETS),
    "m3i_train_checkpoint_seconds": ("histogram", "Wall time of a checkpoint save, failed ones included.", (),
                                     _CHECKPOINT_BUCKETS),
    "m3i_train_checkpoint_failures_total": ("counter", "Checkpoint saves that failed.", (), None),
    "m3i_train_branch_samples_total": ("counter", "Samples that fed each branch's loss.", ("branch",), None),
    "m3i_train_data_shards_failed_total": ("counter", "Shards the loader could not read.", (), None),
    "m3i_train_data_samples_failed_total": ("counter", "Samples the loader could not decode.", (), None),
    "m3i_train_data_samples_padded_total": ("counter", "Samples repeated to even out the ranks' batches.", (), None),
    "m3i_train_gpu_memory_bytes": ("gauge", "CUDA memory of this rank's device (set only where CUDA is available).",
                                   ("kind",), None),
    "m3i_train_step": ("gauge", "Last finished step.", (), None),
    "m3i_train_last_step_timestamp_seconds": ("gauge", "Unix time the last step finished (alert on staleness).",
                                              (), None),
}

SUMMARY_METRIC = "m3i_train_summary"
"""The one gauge :meth:`TrainMetrics.push_summary` pushes, one series per summary entry (label ``name``)."""

METRIC_NAMES: tuple[str, ...] = (*_SPECS, SUMMARY_METRIC)
"""Every metric name m3i training exports (``/metrics`` and the Pushgateway), as PromQL sees it;
histograms by family name (their series end in ``_bucket``, ``_sum``, ``_count``)."""

# name -> (type, help, labels beyond job/model). What m3i.promote pushes (job m3i-promote), read from the log.
PROMOTE_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "m3i_promote_decisions_total": ("counter", "Events of the model's promotion log, by action (promote, reject, rollback).",
                                    ("action",)),
    "m3i_promote_consecutive_rejections": ("gauge", "Candidates rejected since the champion was last set.", ()),
    "m3i_promote_champion_info": ("gauge", "Constant 1; labels name the champion (version, previous).", ("version", "previous")),
    "m3i_promote_champion_timestamp_seconds": ("gauge", "Unix time the champion was set (its age: time() minus this).", ()),
}
PROMOTE_METRIC_NAMES: tuple[str, ...] = tuple(PROMOTE_SPECS)
"""Every metric name ``m3i promote`` pushes to the Pushgateway, as PromQL sees it."""

_BASE_LABELS = ("rank", "run_id")
_TYPES = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}


class TrainMetrics:
    """One rank's training metrics: a private registry, its ``/metrics`` endpoint and the final push.

    Build it with :func:`build_metrics`. All methods are cheap and thread-safe; call them from
    the rank's main process only (see the module docstring).
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
        if cfg.port and cfg.port + local_rank > 65535:
            raise ValueError(
                f"metrics.port={cfg.port} + local_rank={local_rank} = {cfg.port + local_rank} is not a port; "
                "allowed metrics.port + local_rank <= 65535"
            )
        self.cfg = cfg
        self.rank = rank
        self.local_rank = local_rank
        self.run_id = run_id
        self.peak_flops = peak_flops
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"rank": str(rank), "run_id": run_id}
        self._metrics: dict[str, Any] = {}
        for name, (kind, doc, extra, buckets) in _SPECS.items():
            kw: dict[str, Any] = {"buckets": buckets} if buckets else {}
            self._metrics[name] = _TYPES[kind](
                name, doc, labelnames=_BASE_LABELS + extra, registry=self.registry, **kw
            )
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}

        self._m("m3i_train_info", version=m3i.__version__, world_size=str(world_size), model=model).set(1)
        # Counters and histograms exist at 0 from the start so rate() and increase() see the
        # first increment.
        for name, (kind, _, extra, _) in _SPECS.items():
            if kind != "gauge" and not extra:
                self._m(name)
        for branch in BRANCHES:
            self._m("m3i_train_branch_samples_total", branch=branch)

        self._data_seen: dict[str, int] = {}
        self._window_samples = 0
        self._window_seconds = 0.0
        self._window_flops = 0.0
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        if cfg.port:
            self._serve(cfg.host, cfg.port + local_rank)

    # -- serving -------------------------------------------------------------------------------

    def _serve(self, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(
                e.errno,
                f"metrics endpoint of rank {self.rank}: cannot bind {host}:{port} "
                f"(metrics.port={self.cfg.port} + local_rank={self.local_rank}): {e.strerror}; "
                "choose another metrics.port, or 0 to disable the endpoint",
            ) from e
        self.port = self._server.server_port
        # A forked child (a DataLoader worker) inherits the listening socket but not the thread
        # that serves it: close its copy so only this process holds the port.
        ref = weakref.ref(self)

        def forget_in_child() -> None:
            metrics = ref()
            if metrics is not None:
                metrics._drop_in_child()

        os.register_at_fork(after_in_child=forget_in_child)
        log.info("rank %d serves metrics on http://%s:%d/metrics", self.rank, host, self.port)

    def _drop_in_child(self) -> None:
        if self._server is not None:
            try:
                self._server.socket.close()
            except OSError:
                pass
        # Never shutdown() here: no thread serves in the child, it would wait forever.
        self._server = self._thread = None
        self.port = None

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` of the endpoint, or ``None`` when it is off or closed."""
        if self.port is None:
            return None
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "") else self.cfg.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop the endpoint and free its port. Safe to call twice; recording still works after."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self.port = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> TrainMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording -----------------------------------------------------------------------------

    def _m(self, name: str, **extra: str) -> Any:
        key = (name, tuple(sorted(extra.items())))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics[name].labels(**self._labels, **extra)
        return child

    def should_record(self, step: int) -> bool:
        """Whether ``step`` is one whose gauges are recorded (every ``metrics.interval_steps``).

        The loop may use it to skip turning loss tensors into floats (a device sync) between.
        """
        return step % self.cfg.interval_steps == 0

    def on_step(
        self,
        step: int,
        parts: Mapping[str, Any],
        lr: float,
        samples: int,
        step_seconds: float,
        data_wait_seconds: float,
        *,
        branch_samples: Mapping[str, int] | None = None,
        ema_momentum: float | None = None,
        temperature: float | None = None,
        target_std: float | None = None,
        flops: float = 0.0,
    ) -> None:
        """Record a finished step.

        Counters, histograms, ``m3i_train_step`` and the last-step timestamp are updated every
        step; gauges (loss parts, lr, momentum, temperature, target std, throughput, GPU memory)
        on steps where :meth:`should_record` is true, so values that are tensors are only
        converted (a device sync) on those steps.

        Args:
            step: The step that finished.
            parts: The loss dict; every key starting with ``loss`` becomes ``m3i_train_loss{part=key}``.
                ``ema_momentum``, ``temperature`` and ``target_std`` keys are taken too when the
                keyword arguments of the same names are not given. Other keys are ignored.
                Values are floats or 0-d tensors.
            lr: Learning rate of the step.
            samples: Samples this rank trained on in the step.
            step_seconds: Wall time of the step, data wait included.
            data_wait_seconds: Part of ``step_seconds`` spent waiting for the batch.
            branch_samples: Samples that fed each branch's loss (``img``, ``cls``, ``txt``).
            ema_momentum: EMA momentum of the target encoder.
            temperature: Temperature of the image-text loss.
            target_std: Std of the target features (a collapse detector).
            flops: Model FLOPs this rank did in the step (``m3i.models.flops``); with ``peak_flops``
                they give ``m3i_train_mfu_ratio``. 0 leaves both FLOP gauges unset.
        """
        self._m("m3i_train_steps_total").inc()
        if samples:
            self._m("m3i_train_samples_total").inc(samples)
        for branch, n in (branch_samples or {}).items():
            if n:
                self._m("m3i_train_branch_samples_total", branch=branch).inc(n)
        self._m("m3i_train_step_seconds").observe(max(step_seconds, 0.0))
        self._m("m3i_train_data_wait_seconds").observe(max(data_wait_seconds, 0.0))
        with self._lock:
            self._window_samples += samples
            self._window_seconds += max(step_seconds, 0.0)
            self._window_flops += max(float(flops), 0.0)
            record = self.should_record(step)
            if record:
                window_samples, window_seconds, window_flops = self._window_samples, self._window_seconds, self._window_flops
                self._window_samples, self._window_seconds, self._window_flops = 0, 0.0, 0.0
        if record:
            for key, value in parts.items():
                if key.startswith("loss"):
                    self._m("m3i_train_loss", part=key).set(float(value))
            self._m("m3i_train_lr").set(float(lr))
            extras = {"ema_momentum": ema_momentum, "temperature": temperature, "target_std": target_std}
            for key, value in extras.items():
                if value is None:
                    value = parts.get(key)
                if value is not None:
                    self._m(f"m3i_train_{key}").set(float(value))
            if window_seconds > 0:
                self._m("m3i_train_samples_per_second").set(window_samples / window_seconds)
                if window_flops > 0:
                    rate = window_flops / window_seconds
                    self._m("m3i_train_model_flops_per_second").set(rate)
                    if self.peak_flops:
                        self._m("m3i_train_mfu_ratio").set(rate / self.peak_flops)
            self._record_gpu_memory()
        self._m("m3i_train_step").set(step)
        self._m("m3i_train_last_step_timestamp_seconds").set(time.time())

    def on_skipped_step(self) -> None:
        """Count a step whose update was skipped for a NaN/inf loss."""
        self._m("m3i_train_skipped_steps_total").inc()

    def on_overflow_step(self) -> None:
        """Count an optimizer step DeepSpeed skipped for overflowing gradients (the loop retries it)."""
        self._m("m3i_train_overflow_steps_total").inc()

    def on_checkpoint(self, seconds: float, ok: bool) -> None:
        """Record a checkpoint save that took ``seconds``; ``ok=False`` counts a failure."""
        self._m("m3i_train_checkpoint_seconds").observe(max(seconds, 0.0))
        if not ok:
            self._m("m3i_train_checkpoint_failures_total").inc()

    def on_data_stats(self, stats: Mapping[str, int]) -> None:
        """Feed the loader's cumulative failure counts (``ShardLoader.stats()``).

        The source reports totals since it started, so each counter is increased by the
        difference to the previous call. A total below the previous one means the source
        restarted (a new loader): its whole value is new.

        Args:
            stats: ``shards_failed``, ``samples_failed`` and ``samples_padded`` totals; other keys
                are ignored.
        """
        with self._lock:
            for key, total in stats.items():
                name = _DATA_COUNTERS.get(key)
                if name is None:
                    continue
                total = int(total)
                prev = self._data_seen.get(key, 0)
                delta = total - prev if total >= prev else total
                self._data_seen[key] = total
                if delta > 0:
                    self._m(name).inc(delta)

    def _record_gpu_memory(self) -> None:
        # A process that never imported torch runs no CUDA work; importing it here would only
        # cost seconds.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        values = {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "max_allocated": torch.cuda.max_memory_allocated(),
        }
        for kind, value in values.items():
            self._m("m3i_train_gpu_memory_bytes", kind=kind).set(value)

    # -- final push ----------------------------------------------------------------------------

    def push_summary(self, summary: Mapping[str, float], *, timeout: float = 10.0) -> bool:
        """Push the run's summary to ``metrics.pushgateway``; a no-op when that is empty.

        The push carries one gauge, ``m3i_train_summary{name=<key>}``, in a registry of its own,
        under job ``metrics.job`` and grouping key ``run_id`` + ``rank`` (so ranks and runs do
        not overwrite each other; the gateway adds those as labels). A failed push is logged as a
        warning and never raised: the run is done and its checkpoints are what matter.

        Args:
            summary: Name -> value, e.g. ``{"final_loss": 1.7, "steps": 10000, "wall_seconds": 3600}``.
            timeout: Seconds to wait for the gateway.

        Returns:
            ``True`` when the gateway accepted the push.
        """
        if not self.cfg.pushgateway:
            return False
        registry = CollectorRegistry(auto_describe=True)
        gauge = Gauge(SUMMARY_METRIC, "Final summary of a training run, one series per entry.",
                      labelnames=("name",), registry=registry)
        try:
            for key, value in summary.items():
                gauge.labels(name=str(key)).set(float(value))
            push_to_gateway(
                self.cfg.pushgateway,
                job=self.cfg.job,
                registry=registry,
                grouping_key={"run_id": self.run_id, "rank": str(self.rank)},
                timeout=timeout,
            )
        except Exception as e:  # noqa: BLE001 - any failure of the push must not fail the run
            log.warning("rank %d: pushing the summary to %s failed: %s", self.rank, self.cfg.pushgateway, e)
            return False
        return True


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
