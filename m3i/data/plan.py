"""The epoch plan: which samples each rank and DataLoader worker reads, in which order.

Every position is a function of (seed, epoch, world size, workers, batch size) and the
shard index alone, so an epoch can be replayed exactly from any batch.

    global sequence   shards in a seeded order; inside each shard, the tar order through
                      a seeded shuffle buffer. N samples in all.
    rank r            the contiguous block [r*Q, (r+1)*Q) with Q = batches * batch_size,
                      batches = (N // world) // batch_size rounded down to a multiple of
                      the worker count: every rank gets the same number of batches,
                      whatever the shard sizes, so uneven shards never hang a collective.
    worker w          the w-th equal, contiguous chunk of the rank's batches.
    yield order       the DataLoader takes one batch from each worker in turn, so batch j
                      of the rank comes from worker j % W: a resume at batch k tells each
                      worker exactly how many of its batches to skip.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from m3i.artifacts.dataset import ShardInfo

__all__ = ["EpochPlan", "WorkerRange", "derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class WorkerRange:
    """What one worker of one rank reads in one epoch."""

    start: int
    """First position in the global sequence."""
    batches: int
    """Batches it yields."""
    skip_batches: int
    """Batches already consumed before a resume (skipped, not yielded)."""


@dataclass(frozen=True)
class EpochPlan:
    shards: list[ShardInfo]
    """Shards in this epoch's order."""
    counts: list[int]
    """Samples each shard contributes (those of the selected sources)."""
    batches_per_rank: int
    batch_size: int
    world_size: int
    num_workers: int

    @classmethod
    def build(
        cls,
        shards: list[ShardInfo],
        sources: tuple[str, ...],
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        batch_size: int,
        world_size: int,
        num_workers: int,
    ) -> "EpochPlan":
        counts = [sum(s.sources.get(src, 0) for src in sources) for s in shards]
        order = list(range(len(shards)))
        if shuffle:
            order = list(np.random.default_rng(derive_seed("shards", seed, epoch)).permutation(len(shards)))
        shards = [shards[i] for i in order]
        counts = [counts[i] for i in order]
        w = max(1, num_workers)
        batches = (sum(counts) // world_size) // batch_size
        batches -= batches % w
        return cls(shards, counts, batches, batch_size, world_size, num_workers)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def worker_range(self, rank: int, worker: int, consumed: int = 0) -> WorkerRange:
        """Where worker ``worker`` of ``rank`` reads, after ``consumed`` batches of the rank."""
        w = max(1, self.num_workers)
        per_worker = self.batches_per_rank // w
        rank_start = rank * self.batches_per_rank * self.batch_size
        start = rank_start + worker * per_worker * self.batch_size
        # Batches j < consumed with j % w == worker were yielded by this worker.
        skip = max(0, (consumed - worker + w - 1) // w) if consumed > worker else 0
        return WorkerRange(start, per_worker, min(skip, per_worker))
