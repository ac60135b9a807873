"""Is ``/dev/shm`` big enough for the loader? Checked by ``m3i launch`` before anything starts.

Loader workers hand their batches to the rank through shared memory (``/dev/shm``): each of a
rank's ``data.num_workers`` workers keeps up to ``prefetch_factor`` finished batches there, and
one more is on its way to the rank. When ``/dev/shm`` fills up, a worker dies with a bus
error (SIGBUS) or ``No space left on device`` mid-run; on Kubernetes the memory-backed
volume's ``sizeLimit`` (``launch.shm_size``) bounds it, and a pod over it is evicted.

    est = estimate_shm(cfg.launch, cfg)           # numbers: bytes per sample, per batch, needed, available
    warning = check_shm(cfg.launch, cfg)          # None, a warning line, or ValueError when it cannot fit

The bytes of a sample are measured, not assumed: :func:`sample_bytes` runs the run's own
training transform once on a blank image of ``data.image_size`` and adds up the tensors it
returns (``uint8`` pixels count one byte each, float32 four), so the estimate follows the
transform and the loader as they change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from m3i.config import Config, LaunchConfig
from m3i.config.launch import quantity_bytes

__all__ = ["PREFETCH_FACTOR", "ShmEstimate", "check_shm", "estimate_shm", "sample_bytes", "SHM_PATH", "TIGHT_FRACTION"]

PREFETCH_FACTOR = 2
"""Batches each loader worker keeps ready (``prefetch_factor`` of the DataLoader in m3i.data.loader;
tests/test_shm.py checks that they agree)."""

TIGHT_FRACTION = 0.5
"""Above this share of ``/dev/shm`` the loader's need draws a warning: NCCL's intra-node transport
and DeepSpeed use the same space, and a tensor freed late holds its segment a little longer."""

SHM_PATH = "/dev/shm"
"""Where ``local_cwd`` ranks' shared memory lives (its free space is measured at launch)."""


def sample_bytes(cfg: Config, transform: Any = None) -> int:
    """Bytes of one training sample as a loader worker hands it over: the sum of its tensors' bytes.

    Args:
        cfg: The run config (``data``, ``model``, ``objective`` shape the transform's outputs).
        transform: The per-sample transform; ``None`` builds the training transform of ``cfg``.

    Returns:
        ``sum(numel * element_size)`` over the tensors of one transformed sample: for M3I's
        two views at 224 px in ``uint8``, ``2 x 3 x 224 x 224`` bytes plus mask, geometry,
        label and tokens.
    """
    import torch
    from PIL import Image

    if transform is None:
        from m3i.transforms import build_transform

        transform = build_transform(cfg, train=True)
    size = cfg.data.image_size
    # A caption and a label, so that every optional output is made (the text tower's tokens among them).
    sample = {"image": Image.new("RGB", (size, size), (128, 128, 128)), "cls": 0, "txt": "a photo", "source": "labelled", "key": "shm"}
    out = transform(sample, torch.Generator().manual_seed(0))
    return sum(v.numel() * v.element_size() for v in out.values() if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class ShmEstimate:
    """Shared memory the loaders of one host (a pod, or this machine) need, and what it has."""

    ranks: int
    """Ranks sharing this ``/dev/shm``."""
    workers: int
    """Loader workers per rank (``data.num_workers``)."""
    prefetch: int
    """Batches each worker keeps ready."""
    sample_bytes: int
    """One transformed sample (:func:`sample_bytes`)."""
    batch_bytes: int
    """One batch: ``data.batch_size`` samples."""
    capacity: int | None
    """Bytes available: the free space of this machine's ``/dev/shm`` or the pod's ``launch.shm_size``;
    ``None`` when unknown (no ``/dev/shm`` here)."""
    where: str
    """What ``capacity`` is, in words."""

    @property
    def batches_per_rank(self) -> int:
        """Batches of one rank in shared memory at once: ``workers x prefetch`` ready plus one being handed over."""
        return self.workers * self.prefetch + 1 if self.workers else 0

    @property
    def need(self) -> int:
        """Bytes the loaders of all ``ranks`` may hold in ``/dev/shm`` at once."""
        return self.ranks * self.batches_per_rank * self.batch_bytes

    @property
    def level(self) -> str:
        """``ok``, ``tight`` (above :data:`TIGHT_FRACTION` of the capacity) or ``over`` (more than the capacity)."""
        if not self.capacity or not self.need:
            return "ok"
        if self.need > self.capacity:
            return "over"
        return "tight" if self.need > TIGHT_FRACTION * self.capacity else "ok"

    def describe(self) -> str:
        """The numbers in one line."""
        return (
            f"{self.ranks} rank(s) x ({self.workers} loader workers x prefetch {self.prefetch} + 1) batches x "
            f"{_size(self.batch_bytes)} a batch ({_size(self.sample_bytes)} a sample) = {_size(self.need)} of /dev/shm; "
            f"{self.where}: {_size(self.capacity)}"
        )


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:  # no /dev/shm on this system: nothing to check against
        return None
    return st.f_bavail * st.f_frsize


def estimate_shm(launch: LaunchConfig, cfg: Config, *, per_sample: int | None = None) -> ShmEstimate:
    """What the loaders of one host need in ``/dev/shm`` for this launch, and what that host has.

    Args:
        launch: The launch section: ranks per pod and, on Kubernetes, ``shm_size``.
        cfg: The config every rank's ``m3i train`` gets (``data.batch_size``, ``data.num_workers``, the transform).
        per_sample: Bytes of one sample; measured with :func:`sample_bytes` when ``None``.

    Returns:
        A :class:`ShmEstimate`. Locally (``local_cwd``) every replica runs on this machine, so its
        ranks are ``nodes x ranks_per_node`` against the free space of ``/dev/shm`` now; on
        Kubernetes one pod's ranks against its ``launch.shm_size``.
    """
    per_sample = sample_bytes(cfg) if per_sample is None else per_sample
    if launch.scheduler == "local_cwd":
        ranks, capacity, where = launch.nodes * launch.ranks_per_node, _free_bytes(SHM_PATH), f"free in {SHM_PATH} here"
    else:
        ranks, capacity, where = launch.ranks_per_node, quantity_bytes(launch.shm_size), "launch.shm_size of each pod"
    return ShmEstimate(
        ranks=ranks,
        workers=cfg.data.num_workers,
        prefetch=PREFETCH_FACTOR,
        sample_bytes=per_sample,
        batch_bytes=cfg.data.batch_size * per_sample,
        capacity=capacity,
        where=where,
    )


def check_shm(launch: LaunchConfig, cfg: Config, *, per_sample: int | None = None) -> str | None:
    """Refuse a launch whose loaders cannot fit in ``/dev/shm``; say so when they only just fit.

    Args:
        launch: The launch section.
        cfg: The config every rank's ``m3i train`` gets.
        per_sample: As :func:`estimate_shm`.

    Returns:
        ``None`` when the loaders fit with room to spare, else a one-line warning with the numbers.

    Raises:
        ValueError: The loaders need more than ``/dev/shm`` holds, with the numbers and what to change.
    """
    est = estimate_shm(launch, cfg, per_sample=per_sample)
    if est.level == "over":
        grow = "raise launch.shm_size (and launch.memory with it)" if launch.scheduler == "kubernetes" else "free or grow /dev/shm"
        raise ValueError(
            f"the loaders would not fit in /dev/shm: {est.describe()}; lower data.num_workers or data.batch_size, or {grow}"
        )
    if est.level == "tight":
        return f"/dev/shm is tight (over {TIGHT_FRACTION:.0%} for the loaders; NCCL uses it too): {est.describe()}"
    return None
