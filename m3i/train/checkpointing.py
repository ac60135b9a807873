"""When to checkpoint, what goes in, and what a failed save means: the policy over :class:`Checkpointer`.

    restored = restore(checkpointer, ref, engine=engine, ema=ema, state=state)   # on a resume
    manager = CheckpointManager(checkpointer, cfg.checkpoint, info, engine=engine, ema=ema, state=state,
                                meta=meta, flush_history=history.flush, on_save=outputs.on_checkpoint)
    manager.save(step, last=step == total)   # every step: saves when the interval or the end asks
    uri = manager.save_for_sigterm(step, sigterm)

A save is one call. It writes what must be durable before a checkpoint (rank 0's history), then
the engine with the EMA, the trainer's state and the run's facts (:class:`Checkpointer` stages,
uploads, verifies and writes the marker). Whatever part of it fails (the history write, the
staging room, DeepSpeed's files, the rank state, an upload, the marker) is one failed save: it
is logged, reported and counted, and training goes on until
``checkpoint.max_consecutive_failures`` saves failed in a row; the final save and the SIGTERM
save must succeed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from m3i.artifacts import CheckpointRef
from m3i.config.train import CheckpointConfig
from m3i.storage import StorageError
from m3i.train.checkpoint import Checkpointer, Restored
from m3i.train.dist import DistInfo, all_ok
from m3i.train.ema import EMAUpdater
from m3i.train.preemption import SigTerm
from m3i.train.state import TrainState

__all__ = ["CheckpointManager", "restore"]

log = logging.getLogger(__name__)


class CheckpointManager:
    """Saves and restores the engine, the EMA and the trainer's state, and owns the save policy.

    Args:
        checkpointer: Stages, uploads, verifies and loads checkpoints under the run's output.
        cfg: The ``checkpoint`` section (interval, failure limit).
        info: This process's place in the job.
        engine: The DeepSpeed engine.
        ema: The EMA of the target encoder (client state ``ema``).
        state: The trainer's state (client state ``step`` and ``loader``; the rank file).
        meta: Facts of the run saved with every checkpoint (client state ``meta``, and
            ``complete.json``).
        flush_history: Rank 0's history write (:meth:`m3i.train.history.History.flush`), first in
            every save so that a checkpoint's steps are always in the history; ``None`` on the
            other ranks. A ``StorageError`` or ``OSError`` from it fails the save on every rank.
        on_save: Called with the seconds a save took and whether it succeeded, failed ones included.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        cfg: CheckpointConfig,
        info: DistInfo,
        *,
        engine: Any,
        ema: EMAUpdater,
        state: TrainState,
        meta: dict[str, Any] | None = None,
        flush_history: Callable[[], None] | None = None,
        on_save: Callable[[float, bool], None] | None = None,
    ) -> None:
        self.checkpointer, self.cfg, self.info = checkpointer, cfg, info
        self.engine, self.ema, self.state = engine, ema, state
        self.meta = dict(meta or {})
        self.flush_history, self.on_save = flush_history, on_save
        self.failures_in_a_row = 0
        """Saves that failed since the last one that succeeded, whatever part of them failed."""
        last = checkpointer.last_saved_step  # the step restored from, on a resume
        self.last_uri: str | None = checkpointer.uri_of(last) if last is not None else None
        """The URI of the newest complete checkpoint of this run (restored or saved)."""
        self.last_save_seconds: float | None = None
        """Wall time of the last successful save, history write included (the SIGTERM deadline's yardstick)."""

    # -- policy -----------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the interval asks for a checkpoint after ``step`` (and it is not saved already)."""
        return step > 0 and step % self.cfg.interval_steps == 0 and step != self.checkpointer.last_saved_step

    @property
    def give_up(self) -> bool:
        """Whether failed saves in a row reached ``checkpoint.max_consecutive_failures``: then the job must stop."""
        return self.failures_in_a_row >= self.cfg.max_consecutive_failures

    def save(self, step: int, *, last: bool = False) -> str | None:
        """Checkpoint ``step`` when the policy asks: at the interval, and at the ``last`` step.

        Returns:
            The checkpoint's URI; ``None`` when none was due or a non-final save failed.

        Raises:
            StorageError: The ``last`` save failed, or ``checkpoint.max_consecutive_failures``
                saves failed in a row.
        """
        if last:
            return self.save_last(step)
        return self.save_now(step) if self.due(step) else None

    def save_last(self, step: int) -> str | None:
        """Save ``step`` as the final checkpoint unless it is saved already; the newest checkpoint's URI.

        Raises:
            StorageError: The save failed.
        """
        if self.checkpointer.last_saved_step != step:
            self.save_now(step, final=True)
        return self.last_uri

    def save_for_sigterm(self, step: int, sigterm: SigTerm) -> str | None:
        """Save ``step`` after SIGTERM (unless it is saved already), within the grace period as far as it can tell.

        Returns:
            The newest complete checkpoint's URI.

        Raises:
            StorageError: The save failed.
        """
        if self.checkpointer.last_saved_step != step:
            if self.info.is_main:
                sigterm.before_save(step, self.last_save_seconds)
            t0 = time.monotonic()
            self.save_now(step, final=True)
            if self.info.is_main:
                sigterm.after_save(step, time.monotonic() - t0)
        return self.last_uri

    def save_now(self, step: int, *, final: bool = False) -> str | None:
        """One collective save of ``step``; every rank calls it.

        A failed save leaves the previous checkpoint the latest. It is logged, reported to
        :attr:`on_save` and counted in :attr:`failures_in_a_row`, whatever part of it failed.

        Returns:
            The checkpoint's URI, or ``None`` when it failed and training may go on.

        Raises:
            StorageError: The save failed and is ``final`` (the end, SIGTERM), or it was the
                ``checkpoint.max_consecutive_failures``-th failure in a row.
        """
        t0 = time.monotonic()
        try:
            self._write_history(step)
            seconds = self.checkpointer.save(self.engine, step, self._client_state(step), self.state.rank_state())
        except StorageError as e:
            self.failures_in_a_row += 1
            self._report(time.monotonic() - t0, False)
            self._failed(step, e, final)
            return None
        self.failures_in_a_row = 0
        self._report(seconds, True)
        self.last_save_seconds = time.monotonic() - t0
        self.last_uri = self.checkpointer.uri_of(step)
        if self.info.is_main:
            log.info("checkpoint step %d saved in %.1fs", step, seconds)
        return self.last_uri

    def _failed(self, step: int, e: StorageError, final: bool) -> None:
        """Raise when a failed save of ``step`` ends the job; otherwise log that training goes on."""
        limit = self.cfg.max_consecutive_failures
        if final:
            raise e
        if self.give_up:
            raise StorageError(
                f"{e}; that is {self.failures_in_a_row} failed checkpoint saves in a row "
                f"(checkpoint.max_consecutive_failures={limit}), so training stops"
            ) from e
        if self.info.is_main:
            log.error(
                "checkpoint step %d failed (%d in a row, checkpoint.max_consecutive_failures=%d); training goes on "
                "and retries at the next interval: %s", step, self.failures_in_a_row, limit, e,
            )

    def _write_history(self, step: int) -> None:
        """Write the history before checkpoint ``step`` (collective): a checkpoint's steps are always in it.

        Raises:
            StorageError: On every rank when it failed on one; the checkpoint is then not saved.
        """
        err = ""
        if self.flush_history is not None:
            try:
                self.flush_history()
            except (StorageError, OSError) as e:
                err = str(e)
        if not all_ok(not err):
            raise StorageError(f"checkpoint step {step} not saved: writing history.jsonl failed ({err or 'on rank 0'})")

    def _client_state(self, step: int) -> dict[str, Any]:
        if step != self.state.step:
            raise ValueError(f"checkpoint step {step} asked for, but the trainer is at step {self.state.step}")
        return {**self.state.state_dict(), "ema": self.ema.state_dict(), "meta": self.meta}

    def _report(self, seconds: float, ok: bool) -> None:
        if self.on_save is not None:
            self.on_save(seconds, ok)


def restore(checkpointer: Checkpointer, ref: CheckpointRef, *, engine: Any, ema: EMAUpdater, state: TrainState) -> Restored:
    """Load ``ref`` (or the newest older checkpoint that verifies) into the engine, the EMA and the trainer's state.

    Its ``meta`` (``restored.client_state["meta"]``) holds the run's facts as saved, ``init_from``
    among them: the first attempt's weights stay on record.

    Raises:
        StorageError: No checkpoint from ``ref`` down verifies.
        m3i.train.checkpoint.UnsafeCheckpointError: A file holds a pickle that could run code.
    """
    restored = checkpointer.load(engine, ref)
    client = restored.client_state
    ema.load_state_dict(client.get("ema", {}))
    state.load_state_dict(client, restored.rank_state)
    if checkpointer.info.is_main:
        log.info("resumed from %s at step %d", checkpointer.uri_of(restored.ref.step), state.step)
    return restored
