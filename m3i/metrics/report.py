"""One optimizer step, as every output of training sees it: metrics, history, TrainJob status, progress, log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["StepReport"]


@dataclass(frozen=True)
class StepReport:
    """What happened in one applied optimizer step; the trainer builds it once and hands it to every output.

    Values are plain Python numbers (the step's one host sync already happened), so an output
    never touches the device.
    """

    step: int
    """The optimizer step that finished (1 for the first)."""

    steps: int
    """The run's total steps (``train.steps``)."""

    parts: Mapping[str, Any]
    """This rank's loss parts and monitors of the step's last micro-batch (``loss``, ``loss_img``,
    ..., ``n_img``, ``temperature``, ``target_std``, ``ema_momentum``), as floats."""

    lr: float
    """The learning rate the step applied."""

    samples: int
    """Samples this rank trained on in the step: ``data.batch_size`` x ``train.grad_accum``. Per rank,
    like ``branch_samples`` and ``flops``, so that summing ``m3i_train_samples_total`` over ranks
    (the dashboards' ``sum by (run_id)``) gives the run's samples."""

    seconds: float
    """Wall time of the step from its first micro-batch's arrival, data wait included."""

    data_wait_seconds: float
    """Part of the step spent waiting for its batches, summed over its micro-batches."""

    time: float
    """Unix time the step finished."""

    branch_samples: Mapping[str, int] = field(default_factory=dict)
    """Samples that fed each branch's loss (``img``, ``cls``, ``txt``) on this rank."""

    flops: float = 0.0
    """Model FLOPs this rank did in the step (:mod:`m3i.models.flops`); 0 when not counted."""

    data_stats: Mapping[str, int] = field(default_factory=dict)
    """The loader's cumulative failure counts (``shards_failed``, ``samples_failed``, ``samples_padded``)."""

    @property
    def loss_parts(self) -> dict[str, Any]:
        """The entries of :attr:`parts` whose key starts with ``loss``."""
        return {k: v for k, v in self.parts.items() if k.startswith("loss")}
