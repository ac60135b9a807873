"""The trainer's own state: where training is, what it skipped, and what it saves with each checkpoint.

:class:`TrainState` is handed to :class:`m3i.train.checkpointing.CheckpointManager` beside the
engine and the EMA: the step and the data position go into the checkpoint's client state, and
each rank's RNG streams and exact data position into its rank file.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from m3i.data import ShardLoader

__all__ = ["TrainState"]

log = logging.getLogger(__name__)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainState:
    """Step, counts and data position of one rank's training, and how they are saved and restored.

    The counts (:attr:`samples`, :attr:`skipped`, :attr:`overflows`) are this attempt's: a
    resumed run reports what it did itself, as its summary and metrics counters do.

    Args:
        loader: The rank's loader (its position is the data position).
        world_size: Ranks in this job.
    """

    def __init__(self, loader: ShardLoader, world_size: int) -> None:
        self.loader = loader
        self.world_size = world_size
        self.step = 0
        """Applied optimizer steps (saved)."""
        self.resumed_from: int | None = None
        """The checkpoint step this attempt resumed from; ``None`` for a fresh start."""
        self.micro = 0
        """Micro-batches that went through the optimizer in this attempt (not skipped)."""
        self.samples = 0
        """Samples this attempt trained on, every rank."""
        self.skipped = 0
        """Micro-batches skipped for a non-finite loss."""
        self.bad_streak = 0
        """Non-finite losses in a row, up to the last finite one."""
        self.overflows = 0
        """Optimizer steps DeepSpeed skipped for overflowing gradients."""
        self.last_parts: dict[str, float] = {}
        """Loss parts and monitors of the last applied step, as floats."""

    def state_dict(self) -> dict[str, Any]:
        """What every rank shares: the step and this rank's loader position (client state ``step``, ``loader``)."""
        return {"step": self.step, "loader": self.loader.state_dict()}

    def rank_state(self) -> dict[str, Any]:
        """This rank's own part: its loader position and RNG streams (its rank file)."""
        return {"loader": self.loader.state_dict(), "rng": _rng_state()}

    def load_state_dict(self, client: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's client state and this rank's state.

        Args:
            client: The checkpoint's client state (``step``, ``loader``).
            rank_state: This rank's state, or ``None`` when another world size wrote the
                checkpoint: then the loader continues in the same epoch with the same share of it
                done, and the data order continues approximately.
        """
        self.step = self.resumed_from = int(client["step"])
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            _set_rng_state(rank_state["rng"])
            return
        old = client["loader"]
        self.loader.epoch = int(old["epoch"])
        self.loader.consumed = min(self.loader.batches_per_epoch, int(old["batches_consumed"]) * int(old["world_size"]) // self.world_size)
        log.warning("resumed on %d ranks from a %d-rank checkpoint: data order continues approximately", self.world_size, old["world_size"])
