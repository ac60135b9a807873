"""Where a training step goes: each output takes the one :class:`~m3i.metrics.StepReport` the trainer builds.

The outputs of a rank (:func:`build_outputs`):

* :class:`~m3i.metrics.TrainMetrics`: Prometheus series (every rank);
* :class:`HistoryOutput`: ``history.jsonl`` (rank 0);
* :class:`TrainerStatusOutput`: ``TrainJob.status.trainerStatus`` under Kubeflow Trainer (rank 0);
* :class:`ProgressBar`: a tqdm bar (rank 0, with progress on);
* :class:`LogLine`: a log line every ``train.log_every`` steps (rank 0, with progress off).

:class:`Outputs` hands each event to all of them and closes them all, whatever happened.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

from tqdm import tqdm

from m3i.config import Config
from m3i.metrics import StepReport
from m3i.storage import StorageError
from m3i.train.history import History
from m3i.train.progress import TrainerStatusReporter, build_trainer_status

__all__ = ["HistoryOutput", "LogLine", "Output", "Outputs", "ProgressBar", "StepOutput", "TrainerStatusOutput", "build_outputs"]

log = logging.getLogger(__name__)


class Output(Protocol):
    """What the trainer tells an output: every applied step, skipped and overflowed steps, saves; then close."""

    def on_step(self, report: StepReport) -> None: ...

    def on_skipped_step(self) -> None: ...

    def on_overflow_step(self) -> None: ...

    def on_checkpoint(self, seconds: float, ok: bool) -> None: ...

    def close(self) -> None: ...


class StepOutput:
    """An output that cares about steps only: every other event is ignored."""

    def on_step(self, report: StepReport) -> None:
        """Take one applied optimizer step."""

    def on_skipped_step(self) -> None:
        """A micro-batch was skipped for a non-finite loss."""

    def on_overflow_step(self) -> None:
        """DeepSpeed skipped an optimizer step for overflowing gradients."""

    def on_checkpoint(self, seconds: float, ok: bool) -> None:
        """A checkpoint save ended after ``seconds``; ``ok`` whether it succeeded."""

    def close(self) -> None:
        """Training ended, well or not."""


class HistoryOutput(StepOutput):
    """One ``history.jsonl`` row per step: time, lr, every part and monitor, step and data-wait seconds.

    The rows are written at most :data:`m3i.train.history.FLUSH_SECONDS` apart and before each
    checkpoint (:class:`m3i.train.checkpointing.CheckpointManager`); :meth:`close` writes what is
    left after a failure (best effort: the original error matters more).
    """

    def __init__(self, history: History) -> None:
        self.history = history

    def on_step(self, report: StepReport) -> None:
        row = {"step": report.step, "time": report.time, "lr": report.lr, **report.parts}
        self.history.append(row | {"step_seconds": report.seconds, "data_wait_seconds": report.data_wait_seconds})
        self.history.flush_if_due()

    def close(self) -> None:
        if not self.history.pending:  # every save flushed it; rows are pending only after a failure
            return
        try:
            self.history.flush()
        except (StorageError, OSError) as e:
            log.error("history: could not write %d pending rows: %s", self.history.pending, e)


class TrainerStatusOutput(StepOutput):
    """Progress, remaining time and loss parts posted to the TrainJob (see :mod:`m3i.train.progress`)."""

    def __init__(self, reporter: TrainerStatusReporter) -> None:
        self.reporter = reporter

    def on_step(self, report: StepReport) -> None:
        self.reporter.on_step(report.step, report.steps, report.parts)

    def close(self) -> None:
        self.reporter.close()  # sends the last queued update: 100 % after the final step


class ProgressBar(StepOutput):
    """A tqdm bar over the run's steps, its postfix the loss parts every ``log_every`` steps and at the end."""

    def __init__(self, total: int, initial: int, log_every: int) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step")
        self.log_every = log_every

    def on_step(self, report: StepReport) -> None:
        self.bar.update(1)
        if report.step % self.log_every == 0 or report.step == report.steps:
            p = report.parts
            self.bar.set_postfix(loss=f"{p['loss']:.4f}", img=f"{p['loss_img']:.3f}", cls=f"{p['loss_cls']:.3f}", txt=f"{p['loss_txt']:.3f}")

    def close(self) -> None:
        self.bar.close()


class LogLine(StepOutput):
    """``step N/M loss ... lr ...`` in the log every ``log_every`` steps and at the end (instead of a bar)."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def on_step(self, report: StepReport) -> None:
        if report.step % self.log_every == 0 or report.step == report.steps:
            p = report.parts
            log.info(
                "step %d/%d loss %.4f (img %.4f cls %.4f txt %.4f) lr %.2e",
                report.step, report.steps, p["loss"], p["loss_img"], p["loss_cls"], p["loss_txt"], report.lr,
            )


class Outputs:
    """All outputs of a rank, in order; each event goes to every one of them.

    Args:
        outputs: What takes the events (:class:`StepOutput` subclasses, :class:`~m3i.metrics.TrainMetrics`).
    """

    def __init__(self, outputs: Sequence[Output]) -> None:
        self.outputs = list(outputs)

    def on_step(self, report: StepReport) -> None:
        for o in self.outputs:
            o.on_step(report)

    def on_skipped_step(self) -> None:
        for o in self.outputs:
            o.on_skipped_step()

    def on_overflow_step(self) -> None:
        for o in self.outputs:
            o.on_overflow_step()

    def on_checkpoint(self, seconds: float, ok: bool) -> None:
        for o in self.outputs:
            o.on_checkpoint(seconds, ok)

    def close(self) -> None:
        """Close every output, each even when another fails (logged): closing never hides training's own error."""
        for o in self.outputs:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - the rest must still close; the failure is logged
                log.exception("closing the training output %s failed", type(o).__name__)


def build_outputs(cfg: Config, is_main: bool, metrics: Output, history: History | None, *, progress: bool, initial_step: int) -> Outputs:
    """A rank's outputs: its metrics; on rank 0 also the history, the TrainJob status and a bar or a log line.

    Args:
        cfg: The run's config (``train.steps``, ``train.log_every``, ``metrics``).
        is_main: Whether this is rank 0.
        metrics: The rank's :class:`~m3i.metrics.TrainMetrics`.
        history: Rank 0's history writer; ``None`` elsewhere.
        progress: A progress bar (else a log line every ``train.log_every`` steps).
        initial_step: The step training starts from (where the bar starts).
    """
    outputs = Outputs([metrics])
    try:
        if history is not None:
            outputs.outputs.append(HistoryOutput(history))
        status = build_trainer_status(cfg.metrics, is_main)  # None outside a Kubeflow TrainJob
        if status is not None:
            outputs.outputs.append(TrainerStatusOutput(status))
        if is_main and progress:
            outputs.outputs.append(ProgressBar(cfg.train.steps, initial_step, cfg.train.log_every))
        elif is_main:
            outputs.outputs.append(LogLine(cfg.train.log_every))
    except BaseException:
        outputs.close()  # what was built so far (a reporter's thread) must not outlive the failure
        raise
    return outputs
