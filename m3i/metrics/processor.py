"""What a step's numbers become: the computing half of training metrics, with no Prometheus in it.

:class:`MetricsProcessor` turns a :class:`~m3i.metrics.report.StepReport` (and the loader's
cumulative failure counts) into an :class:`Update`: counter increments, histogram observations
and gauge values by the names of :data:`m3i.metrics.names.TRAIN_SPECS`. It keeps the only state
this needs: the throughput window since the last recorded step and the last data totals seen.
:class:`m3i.metrics.series.TrainSeries` applies an update to a registry; nothing here serves.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Mapping

from m3i.metrics.names import DATA_COUNTERS
from m3i.metrics.report import StepReport

__all__ = ["MetricsProcessor", "Update"]

_GAUGES_FROM_PARTS = ("ema_momentum", "temperature", "target_std")


@dataclass
class Update:
    """Changes to a rank's series: ``(name, value, extra labels)`` entries by kind."""

    inc: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)
    observe: list[tuple[str, float]] = field(default_factory=list)
    set: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)

    def add(self, name: str, value: float, **labels: str) -> None:
        self.inc.append((name, value, labels))

    def gauge(self, name: str, value: float, **labels: str) -> None:
        self.set.append((name, value, labels))


class MetricsProcessor:
    """Computes a rank's metric values from its step reports: rates, MFU, branch counts, data deltas.

    Args:
        interval_steps: Gauges are computed on steps divisible by it (``metrics.interval_steps``);
            counters and histograms on every step.
        peak_flops: Dense peak FLOP/s of the rank's device for the run's precision
            (:func:`m3i.models.flops.peak_flops`); ``None`` leaves ``m3i_train_mfu_ratio`` unset.

    Thread-safe; cheap enough for every step.
    """

    def __init__(self, interval_steps: int = 1, peak_flops: float | None = None) -> None:
        self.interval_steps = interval_steps
        self.peak_flops = peak_flops
        self._lock = threading.Lock()
        self._window = (0, 0.0, 0.0)  # samples, seconds, FLOPs since the last recorded step
        self._data_seen: dict[str, int] = {}

    def should_record(self, step: int) -> bool:
        """Whether ``step`` is one whose gauges are computed (every ``interval_steps``)."""
        return step % self.interval_steps == 0

    def step(self, report: StepReport) -> Update:
        """The update for one finished step.

        Counters, histograms, ``m3i_train_step`` and the last-step timestamp change every step;
        gauges (loss parts, lr, EMA momentum, temperature, target std, throughput, MFU, GPU
        memory) on steps where :meth:`should_record` is true, so a value is only converted to a
        float on those steps. Keys of ``report.parts`` starting with ``loss`` become
        ``m3i_train_loss{part=key}``; ``ema_momentum``, ``temperature`` and ``target_std`` their
        own gauges; other keys are ignored.
        """
        up = Update()
        up.add("m3i_train_steps_total", 1)
        if report.samples:
            up.add("m3i_train_samples_total", report.samples)
        for branch, n in report.branch_samples.items():
            if n:
                up.add("m3i_train_branch_samples_total", n, branch=branch)
        seconds = max(report.seconds, 0.0)
        up.observe += [("m3i_train_step_seconds", seconds), ("m3i_train_data_wait_seconds", max(report.data_wait_seconds, 0.0))]
        window = self._advance(report.step, report.samples, seconds, max(float(report.flops), 0.0))
        if window is not None:
            self._gauges(up, report, *window)
        up.gauge("m3i_train_step", report.step)
        up.gauge("m3i_train_last_step_timestamp_seconds", report.time)
        return up

    def _advance(self, step: int, samples: int, seconds: float, flops: float) -> tuple[int, float, float] | None:
        """Add a step to the throughput window; on a recorded step return the window and start a new one."""
        with self._lock:
            n, s, f = self._window
            self._window = (n + samples, s + seconds, f + flops)
            if not self.should_record(step):
                return None
            window, self._window = self._window, (0, 0.0, 0.0)
        return window

    def _gauges(self, up: Update, report: StepReport, samples: int, seconds: float, flops: float) -> None:
        for key, value in report.loss_parts.items():
            up.gauge("m3i_train_loss", float(value), part=key)
        up.gauge("m3i_train_lr", float(report.lr))
        for key in _GAUGES_FROM_PARTS:
            if report.parts.get(key) is not None:
                up.gauge(f"m3i_train_{key}", float(report.parts[key]))
        if seconds > 0:
            up.gauge("m3i_train_samples_per_second", samples / seconds)
            if flops > 0:
                rate = flops / seconds
                up.gauge("m3i_train_model_flops_per_second", rate)
                if self.peak_flops:
                    up.gauge("m3i_train_mfu_ratio", rate / self.peak_flops)
        for kind, value in _gpu_memory().items():
            up.gauge("m3i_train_gpu_memory_bytes", value, kind=kind)

    def data_stats(self, stats: Mapping[str, int]) -> Update:
        """The counter increments for the loader's cumulative failure counts (``ShardLoader.stats()``).

        The source reports totals since it started, so each counter grows by the difference to
        the previous call. A total below the previous one means the source restarted (a new
        loader): its whole value is new. Keys other than ``shards_failed``, ``samples_failed``
        and ``samples_padded`` are ignored.
        """
        up = Update()
        with self._lock:
            for key, total in stats.items():
                name = DATA_COUNTERS.get(key)
                if name is None:
                    continue
                total = int(total)
                prev = self._data_seen.get(key, 0)
                delta = total - prev if total >= prev else total
                self._data_seen[key] = total
                if delta > 0:
                    up.add(name, delta)
        return up


def _gpu_memory() -> dict[str, int]:
    """CUDA memory of this process's device by kind; ``{}`` without CUDA."""
    # A process that never imported torch runs no CUDA work; importing it here would only cost seconds.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "max_allocated": torch.cuda.max_memory_allocated(),
    }
