"""The trainer: a short :meth:`Trainer.train` over :meth:`Trainer.train_step`, which runs micro-batches through
:meth:`Trainer.forward_backward` until one optimizer step is taken.

Each part owns its policy: the checkpoint manager decides when to save and what a failed save
means, the outputs what they do with a step's report, the loader what comes next. The trainer
only moves batches through the engine, keeps its state (:class:`~m3i.train.state.TrainState`),
and builds one :class:`~m3i.metrics.StepReport` per optimizer step for every output.

No autocast, on CPU and CUDA alike: DeepSpeed's bf16/fp16 engine holds the weights in that dtype
and the model casts its own inputs (on CUDA DeepSpeed would turn an outer autocast off inside
the engine anyway). Each micro-batch costs one host sync (:func:`sync_micro_batch`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, Iterator

import torch
import torch.distributed as dist

from m3i.config import Config
from m3i.data import ShardLoader, to_device
from m3i.metrics import BRANCHES, StepReport
from m3i.models import ema_momentum
from m3i.models.flops import StepFlopCounter
from m3i.train.checkpointing import CheckpointManager
from m3i.train.dist import DistInfo
from m3i.train.ema import EMAUpdater
from m3i.train.outputs import Outputs
from m3i.train.preemption import SigTerm
from m3i.train.state import TrainState

__all__ = ["Preempted", "Trainer", "TrainingDiverged", "sync_micro_batch"]

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """SIGTERM arrived; a complete checkpoint was saved. Exit 143 so a restart policy retries."""

    exit_code = 143


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; nothing was saved after the first of them."""


def sync_micro_batch(loss: torch.Tensor, parts: dict[str, torch.Tensor] | None, sigterm: bool) -> tuple[bool, bool, dict[str, float]]:
    """The one host sync of a micro-batch: whether ``loss`` is finite and no SIGTERM arrived, on every
    rank, and (when ``parts`` is given) this rank's parts as floats.

    One device tensor ``[finite, no SIGTERM, *parts]``: its first two entries are MIN-reduced across
    ranks on the device, then the whole tensor reaches the host in one copy.

    Returns:
        ``(finite everywhere, no SIGTERM anywhere, parts as floats or {})``.
    """
    # torch.full, not a tensor from a Python value: on CUDA that would be a blocking host-to-device copy.
    flags = torch.stack([torch.isfinite(loss.detach()).all().float(), torch.full((), float(not sigterm), device=loss.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if flags.is_cuda and dist.get_backend() != "nccl":
            flags = flags.cpu()  # gloo on a CUDA run: one more copy
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    names = list(parts or ())
    packed = torch.cat([flags, torch.stack([parts[k].detach().float().reshape(()).to(flags.device) for k in names])]) if names else flags
    host = packed.tolist()
    return host[0] > 0, host[1] > 0, dict(zip(names, host[2:]))


class Trainer:
    """Trains one rank from its state to ``train.steps``.

    Args:
        cfg: The run's config.
        info: This process's place in the job.
        loader: The rank's batches.
        engine: The DeepSpeed engine.
        scheduler: The engine's LR scheduler (its rate is the one the next optimizer step applies).
        ema: The EMA of the target encoder, stepped after every applied optimizer step.
        state: Where training is (restored already on a resume).
        checkpoints: Saves the engine, the EMA and ``state``; owns the save policy.
        outputs: Where each step's report goes; closed when training ends, well or not.
    """

    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        *,
        loader: ShardLoader,
        engine: Any,
        scheduler: Any,
        ema: EMAUpdater,
        state: TrainState,
        checkpoints: CheckpointManager,
        outputs: Outputs,
    ) -> None:
        self.cfg, self.info = cfg, info
        self.loader, self.engine, self.scheduler, self.ema = loader, engine, scheduler, ema
        self.state, self.checkpoints, self.outputs = state, checkpoints, outputs
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self.global_samples = cfg.data.batch_size * info.world_size  # of one micro-batch, every rank
        self.micro_flops: int | None = None  # model FLOPs of one micro-batch on this rank, counted on the first one
        self.sigterm: SigTerm | None = None  # the handler, installed while train() runs
        self.stop = False  # SIGTERM reached some rank: save and stop at this step boundary
        self._batches = self._forever()

    def train(self) -> None:
        """Train until ``train.steps``; the last step's checkpoint is saved.

        Raises:
            Preempted: SIGTERM arrived; a complete checkpoint holds the progress.
            TrainingDiverged: ``train.max_bad_steps`` non-finite losses in a row.
            m3i.storage.StorageError: The final or SIGTERM save failed, or
                ``checkpoint.max_consecutive_failures`` saves in a row.
        """
        self.sigterm = SigTerm()
        try:
            while self.state.step < self.cfg.train.steps:
                report = self.train_step()
                if report is not None:
                    self.outputs.on_step(report)
                if self.stop:
                    raise self._preempted()
                if report is not None:
                    self.checkpoints.save(report.step, last=report.step >= self.cfg.train.steps)
            self.checkpoints.save_last(self.state.step)
        finally:
            self.sigterm.restore()
            try:
                self.outputs.close()
            finally:
                # Stop the loader's worker processes now. They ignore SIGTERM (a preemption save must
                # finish), and this trainer and its batch generator refer to each other, so they would
                # otherwise live until a garbage collection, or hold the process at exit.
                self._batches.close()
                self.loader.close()

    def train_step(self) -> StepReport | None:
        """Run micro-batches up to one optimizer step (``train.grad_accum`` finite ones; a non-finite one is skipped).

        Returns:
            The step's report when the optimizer applied it; ``None`` when DeepSpeed skipped it for
            overflowing gradients (it held its schedule: the step count and the EMA hold too, and
            the next call retries the step).

        Raises:
            TrainingDiverged: ``train.max_bad_steps`` non-finite losses in a row.
        """
        accum = self.cfg.train.grad_accum
        t_first = wait = 0.0
        while True:
            t_wait = time.monotonic()
            batch = next(self._batches)
            t0 = time.monotonic()
            if self.state.micro % accum == 0:  # the step's first micro-batch
                t_first, wait = t0, 0.0
            wait += t0 - t_wait
            boundary = (self.state.micro + 1) % accum == 0
            finite, no_sigterm, host = self.forward_backward(batch, boundary)
            if not finite:
                self._skip()
                continue
            self.state.bad_streak = 0
            lr = self.scheduler.get_last_lr()[0]  # the rate this optimizer step applies; engine.step() moves the schedule on
            self.engine.step()
            self.state.micro += 1
            self.state.samples += self.global_samples
            if boundary:
                break
        self.stop = not no_sigterm
        if not self.engine.was_step_applied():
            self._overflow()
            return None
        return self._finish_step(host, lr, t_first, wait)

    def forward_backward(self, batch: dict[str, Any], boundary: bool) -> tuple[bool, bool, dict[str, float]]:
        """One micro-batch through the engine, backward only when its loss is finite on every rank.

        Args:
            batch: The loader's batch (uint8 views, normalised here on the device).
            boundary: Whether it is the step's last micro-batch (its parts are the step's).

        Returns:
            ``(finite everywhere, no SIGTERM anywhere, this rank's parts as floats on a boundary else {})``.
        """
        batch = to_device(batch, self.info.device, self.dtype)
        counter = StepFlopCounter() if self.micro_flops is None else nullcontext()
        with counter:
            parts = self.engine(batch)
            loss = parts["loss"]
            sigterm = self.sigterm is not None and self.sigterm.received
            finite, no_sigterm, host = sync_micro_batch(loss, parts if boundary else None, sigterm)
            if finite:
                self.engine.backward(loss)
        if finite and self.micro_flops is None:
            self.micro_flops = counter.total
        return finite, no_sigterm, host

    def _skip(self) -> None:
        """Count a non-finite micro-batch; too many in a row end training."""
        s = self.state
        s.skipped += 1
        s.bad_streak += 1
        self.outputs.on_skipped_step()
        log.warning("step %d: non-finite loss on some rank; skipped (%d in a row)", s.step, s.bad_streak)
        if s.bad_streak >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{s.bad_streak} non-finite losses in a row at step {s.step} (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); the last complete checkpoint is untouched. "
                "Lower train.lr, raise train.warmup_steps, or check the data."
            )

    def _overflow(self) -> None:
        """Count an optimizer step DeepSpeed skipped (fp16 overflow, or inf/NaN gradients in bf16)."""
        self.state.overflows += 1
        self.outputs.on_overflow_step()
        if self.info.is_main:
            log.warning("step %d: gradients overflowed; DeepSpeed skipped the update (%d so far)", self.state.step + 1, self.state.overflows)

    def _finish_step(self, parts: dict[str, float], lr: float, t_first: float, wait: float) -> StepReport:
        """Advance the step and the EMA after an applied optimizer step; the step's report."""
        cfg, s = self.cfg, self.state
        s.step += 1
        self.ema.step(ema_momentum(s.step, cfg.train.steps, cfg.model.ema_m0))
        s.last_parts = parts
        accum = cfg.train.grad_accum
        return StepReport(
            step=s.step,
            steps=cfg.train.steps,
            parts=parts,
            lr=lr,
            samples=cfg.data.batch_size * accum,  # this rank's, as the metrics count per rank
            seconds=time.monotonic() - t_first,
            data_wait_seconds=wait,
            time=time.time(),
            branch_samples={b: int(parts.get(f"n_{b}", 0)) * accum for b in BRANCHES},
            flops=(self.micro_flops or 0) * accum,
            data_stats=self.loader.stats(),
        )

    def _preempted(self) -> Preempted:
        """Save the current step for SIGTERM (unless it is saved already); the exception that ends training."""
        uri = self.checkpoints.save_for_sigterm(self.state.step, self.sigterm)
        return Preempted(f"SIGTERM at step {self.state.step}; checkpoint {uri} is complete")

    def _forever(self) -> Iterator[dict[str, Any]]:
        """The loader's batches, epoch after epoch (an epoch starts only when its first batch is asked for)."""
        while True:
            yield from self.loader
