"""The training loader: a resumable, rank-aware DataLoader over an ``m3i shard`` data set."""

from __future__ import annotations

import atexit
import functools
import multiprocessing.util  # noqa: F401 - registers its exit hook before ours (see _stop_all_workers)
import weakref
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from m3i.artifacts.dataset import ShardIndex, check_shards, read_index
from m3i.config import DataConfig
from m3i.data.dataset import Counters, Position, ShardStream, preload_decoders
from m3i.data.device import current_device, pin_memory_for
from m3i.data.gopen import register_s3_scheme
from m3i.data.plan import EpochPlan, derive_seed
from m3i.storage import open_store

__all__ = ["ShardLoader", "ImageTransform", "build_loader"]

class ImageTransform:
    """A fixed transform: resize the shorter side, centre-crop; keeps cls.

    Deterministic, so it ignores the generator; it is what the plain loader pass uses.
    Training plugs in the M3I two-view transform instead. The image stays ``uint8``
    (``[3, S, S]``); :func:`m3i.data.to_device` normalises the batch where the model runs.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        img: Image.Image = sample["image"]
        w, h = img.size
        s = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return {"image": x.permute(2, 0, 1), "cls": torch.tensor(sample["cls"], dtype=torch.long)}


# DataLoader iterators whose (persistent) worker processes may be alive; see _stop_all_workers.
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _stop_workers(it: Any) -> None:
    """Stop the workers of a multi-process DataLoader iterator (private DataLoader API, hence the guards)."""
    _LIVE.discard(it)
    if not hasattr(it, "_shutdown_workers"):
        return
    it._shutdown_workers()  # asks each worker to exit, waits a while, then sends SIGTERM
    for w in getattr(it, "_workers", []):
        if w.is_alive():  # busy past the wait, and SIGTERM is ignored: SIGKILL
            w.kill()
            w.join()


@atexit.register
def _stop_all_workers() -> None:
    """Stop persistent workers at interpreter exit, before multiprocessing's own exit hook.

    That hook (registered earlier, so run later: atexit is last-in, first-out) terminates
    daemonic children with SIGTERM and joins them; our workers ignore SIGTERM (see
    ``ShardStream.__iter__``), so without this the join would wait forever for the workers
    of a loader that is still referenced (or in a reference cycle) at exit.
    """
    for it in list(_LIVE):
        _stop_workers(it)


class ShardLoader:
    """Batches of one rank, epoch after epoch, resumable mid-epoch.

    Iterating yields the rest of the current epoch and then advances the epoch.
    ``state_dict()`` after k batches, restored into a loader with the same world
    size, worker count and batch size, yields exactly the batches k+1, k+2, ... that
    the first loader would have.

    With ``data.num_workers > 0`` the DataLoader worker processes start at the first
    iteration and stay alive for every later epoch and resume of this loader (they read
    the epoch and resume point from shared memory when each pass starts); :meth:`close`
    stops them, as does dropping the loader. The transform and collate function are
    copied into the workers when they start: replace them before the first iteration.

    Batches bound for a CUDA device come in pinned host memory (the DataLoader's
    ``pin_memory``), so that :func:`m3i.data.to_device`'s ``non_blocking`` copies overlap
    with the device's work; for the CPU they do not (pinning would only add a copy).

    Args:
        cfg: The ``data`` config section.
        transform: ``transform(sample, generator) -> dict``; default :class:`ImageTransform`.
        rank: This process's rank.
        world_size: Number of ranks reading the data set.
        collate: Turns a list of transformed samples into a batch.
        device: Where the batches go. ``None``: :func:`m3i.data.device.current_device` when the
            workers start, i.e. the GPU that ``init_distributed`` selected, else the CPU. Only
            whether batches are pinned depends on it; the loader itself never touches CUDA.
    """

    def __init__(
        self,
        cfg: DataConfig,
        transform: Callable | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable = default_collate,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range for world_size={world_size}")
        register_s3_scheme()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.transform = transform or ImageTransform(cfg.image_size)
        self.collate = collate
        self.device = None if device is None else torch.device(device)
        self.store = open_store(cfg.shards)
        self.index: ShardIndex = read_index(self.store)
        self.shards = self.index.shards(cfg.split)
        # Deleted shards: one line naming them now, not a worker's traceback once training has started.
        check_shards(self.store, self.index, cfg.split)
        self.counters = Counters()
        self.epoch = 0
        self.consumed = 0
        self._planner = functools.partial(
            EpochPlan.build,
            self.shards,
            cfg.sources,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
            world_size=world_size,
            num_workers=cfg.num_workers,
        )
        self._position = Position()
        self._dataloader: DataLoader | None = None
        if self.batches_per_epoch == 0:
            n = self.plan(0).num_samples
            raise ValueError(
                f"data.batch_size={cfg.batch_size}: {cfg.shards} split {cfg.split!r} has {n} samples of sources "
                f"{list(cfg.sources)}, too few for one batch per rank and worker "
                f"(world_size={world_size}, num_workers={cfg.num_workers})"
            )

    def plan(self, epoch: int) -> EpochPlan:
        return self._planner(epoch=epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (equal on every rank)."""
        return self.plan(self.epoch).batches_per_rank

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def stats(self) -> dict[str, int]:
        """Failures so far: ``shards_failed``, ``samples_failed``, ``samples_padded``."""
        return self.counters.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: restore it with :meth:`load_state_dict`."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self.consumed,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.cfg.batch_size,
            "index_plan_sha256": self.index.raw.get("plan_sha256"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position.

        Raises:
            ValueError: When the saved run read with another world size, worker count,
                batch size, seed or data set: its sample order cannot be restored then.
        """
        for key, mine in (
            ("world_size", self.world_size),
            ("num_workers", self.cfg.num_workers),
            ("batch_size", self.cfg.batch_size),
            ("seed", self.cfg.seed),
            ("index_plan_sha256", self.index.raw.get("plan_sha256")),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state {key}={state.get(key)!r} differs from this run's {mine!r}; "
                    "the exact sample order can only be restored with the same value"
                )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["batches_consumed"])

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _make_dataloader(self) -> DataLoader:
        stream = ShardStream(
            self.store.uri,
            self._planner,
            self._position,
            rank=self.rank,
            seed=self.cfg.seed,
            sources=self.cfg.sources,
            transform=self.transform,
            shuffle_buffer=self.cfg.shuffle_buffer if self.cfg.shuffle else 1,
            verify=self.cfg.verify_checksums,
            counters=self.counters,
            collate=self.collate,
        )
        workers = self.cfg.num_workers
        if workers:
            preload_decoders()
        device = self.device if self.device is not None else current_device()
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory_for(device),
            prefetch_factor=2 if workers else None,
            # The DataLoader draws its workers' base seed at every iterator it creates; from
            # its own generator, the run's global torch RNG stays untouched by the loader.
            # (Samples are seeded per key, so worker seeds do not reach any batch.)
            generator=torch.Generator().manual_seed(derive_seed("dataloader", self.cfg.seed, self.rank)),
        )

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan(self.epoch)
        if self.consumed < plan.batches_per_rank:
            if self._dataloader is None:
                self._dataloader = self._make_dataloader()
            # Set before iter(): resetting persistent workers starts their next pass at once.
            self._position.set(self.epoch, self.consumed)
            batches = iter(self._dataloader)
            if self.cfg.num_workers:
                _LIVE.add(batches)
            for batch in batches:
                self.consumed += 1
                yield batch
        self.epoch += 1
        self.consumed = 0

    def close(self) -> None:
        """Stop the worker processes now, not only when the loader is garbage-collected.

        A later iteration starts new workers.
        """
        it = getattr(self._dataloader, "_iterator", None)
        self._dataloader = None
        if it is not None:
            _stop_workers(it)


def build_loader(
    cfg: DataConfig,
    transform: Callable | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> ShardLoader:
    """The loader of ``cfg`` for one rank, its batches bound for ``device`` (see :class:`ShardLoader`)."""
    return ShardLoader(cfg, transform, rank=rank, world_size=world_size, device=device)
