"""Checkpoints in object storage: atomic, resumable, pruned; the checkpointer owns the policy.

Layout under ``<train.output>/checkpoints/``::

    step-00000500/ds/...            DeepSpeed's files (model + EMA target, optimizer shards,
                                    LR scheduler, client state)
    step-00000500/rank-00003.pt     per-rank state: RNG streams, loader position
    step-00000500/complete.json     written LAST by rank 0, after every rank's upload
                                    succeeded: a checkpoint without it does not exist

A save is collective: DeepSpeed writes into a node-local staging folder, the first
process of each node uploads what its node wrote, all ranks agree that every upload
succeeded, and only then does rank 0 write the completion marker and prune old
checkpoints (marker first, so a half-deleted checkpoint is never "complete").
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3i.config.train import CheckpointConfig
from m3i.storage import Store, StorageError, open_store
from m3i.train.dist import DistInfo, all_ok, barrier, broadcast_object

__all__ = ["Checkpointer", "CheckpointRef", "find_latest", "run_output_of", "PREFIX"]

log = logging.getLogger(__name__)
PREFIX = "checkpoints"
MARKER = "complete.json"
_TAG = re.compile(r"^step-(\d{8})$")


def run_output_of(checkpoint_uri: str) -> str | None:
    """The run output holding ``<output>/checkpoints/step-XXXXXXXX``; ``None`` for a checkpoint outside that layout."""
    parts = checkpoint_uri.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == PREFIX:
        return parts[0]
    if len(parts) == 2 and parts[0] == PREFIX:
        return "."
    return None


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint in the store."""

    tag: str
    step: int
    manifest: dict[str, Any]


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def list_complete(store: Store) -> list[CheckpointRef]:
    """Every complete checkpoint under ``checkpoints/``, oldest first."""
    refs = []
    for obj in store.list(f"{PREFIX}/"):
        parts = obj.key.split("/")
        if len(parts) == 3 and parts[2] == MARKER and _TAG.match(parts[1]):
            manifest = store.read_json(obj.key)
            refs.append(CheckpointRef(parts[1], int(manifest["step"]), manifest))
    return sorted(refs, key=lambda r: r.step)


def find_latest(output_uri: str) -> CheckpointRef | None:
    """The newest complete checkpoint of the run at ``output_uri``, if any."""
    refs = list_complete(open_store(output_uri))
    return refs[-1] if refs else None


class Checkpointer:
    """Saves and restores a DeepSpeed engine plus per-rank state under ``<output>/checkpoints``.

    Args:
        cfg: The ``checkpoint`` section.
        output_uri: The run folder or ``s3://`` prefix.
        info: This process's place in the job.
        run_id: Used to name the staging folder.
    """

    def __init__(self, cfg: CheckpointConfig, output_uri: str, info: DistInfo, run_id: str) -> None:
        self.cfg, self.info = cfg, info
        self.store = open_store(output_uri)
        base = Path(cfg.staging_dir) if cfg.staging_dir else Path(tempfile.gettempdir()) / "m3i-staging"
        self.staging = base / re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
        self.last_saved_step: int | None = None

    # -- policy -------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the interval policy asks for a checkpoint after ``step``."""
        return step > 0 and step % self.cfg.interval_steps == 0 and step != self.last_saved_step

    # -- save ---------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> float:
        """Collectively save a checkpoint of ``step``; returns the seconds it took.

        Raises:
            StorageError: When any rank's upload failed; the previous checkpoint stays the latest.
        """
        t0 = time.monotonic()
        tag = tag_of(step)
        local = self.staging / tag
        if self.info.local_rank == 0 and local.exists():
            shutil.rmtree(local)
        barrier()
        engine.save_checkpoint(str(self.staging / tag), tag="ds", client_state=client_state, save_latest=False)
        torch.save(rank_state, local / f"rank-{self.info.rank:05d}.pt")
        barrier()
        ok, err = True, ""
        if self.info.local_rank == 0:
            try:
                self._upload(local, f"{PREFIX}/{tag}")
            except (StorageError, OSError) as e:
                ok, err = False, str(e)
                log.error("checkpoint %s: upload from node %d failed: %s", tag, self.info.node_rank, e)
        if not all_ok(ok):
            self._cleanup(local)
            raise StorageError(f"checkpoint {tag} was not completed: an upload failed ({err or 'on another node'})")
        if self.info.is_main:
            files = [
                {"key": o.key[len(f"{PREFIX}/{tag}/") :], "bytes": o.size}
                for o in self.store.list(f"{PREFIX}/{tag}/")
                if not o.key.endswith(MARKER)
            ]
            self.store.write_manifest(
                f"{PREFIX}/{tag}/{MARKER}",
                {"step": step, "world_size": self.info.world_size, "files": files, "created_unix": int(time.time()), **client_state.get("meta", {})},
            )
            self._prune()
        barrier()
        self._cleanup(local)
        self.last_saved_step = step
        return time.monotonic() - t0

    def _upload(self, local: Path, prefix: str) -> None:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.store.put_file(f"{prefix}/{path.relative_to(local).as_posix()}", str(path))

    def _cleanup(self, local: Path) -> None:
        if self.info.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)

    def _prune(self) -> None:
        refs = list_complete(self.store)
        for ref in refs[: max(0, len(refs) - self.cfg.keep_last)]:
            prefix = f"{PREFIX}/{ref.tag}/"
            self.store.delete(prefix + MARKER)  # first: it stops being a checkpoint at once
            for obj in self.store.list(prefix):
                self.store.delete(obj.key)
        # Leftovers of saves that never completed (a crash mid-upload), older than the latest.
        if refs:
            newest = refs[-1].step
            complete = {r.tag for r in refs}
            for obj in self.store.list(f"{PREFIX}/"):
                parts = obj.key.split("/")
                m = _TAG.match(parts[1]) if len(parts) > 2 else None
                if m and parts[1] not in complete and int(m.group(1)) < newest:
                    self.store.delete(obj.key)

    # -- load ---------------------------------------------------------------

    def latest(self) -> CheckpointRef | None:
        """The newest complete checkpoint, as rank 0 sees it, on every rank."""
        ref = None
        if self.info.is_main:
            refs = list_complete(self.store)
            ref = refs[-1] if refs else None
        return broadcast_object(ref)

    def load(self, engine, ref: CheckpointRef) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore ``engine`` from ``ref``; returns (client state, this rank's state or None).

        The rank state is ``None`` when the checkpoint was written by another world size.
        Then ZeRO-0 restores everything but the RNG streams and the exact data order;
        ZeRO-1/2 also restart the Adam moments (this DeepSpeed cannot re-cut optimizer
        shards, and its universal-checkpoint converter expects Megatron-style state);
        ZeRO-3 refuses with ``ValueError``.
        """
        saved_world = int(ref.manifest.get("world_size", self.info.world_size))
        same_world = saved_world == self.info.world_size
        stage = engine.zero_optimization_stage()
        if not same_world and stage == 3:
            raise ValueError(
                f"checkpoint {ref.tag} was written by {saved_world} ranks with train.zero_stage=3; it resumes only on "
                f"{saved_world} ranks (this job has {self.info.world_size})"
            )
        # ZeRO-1/2 optimizer shards are cut for the saved data-parallel size, and this DeepSpeed
        # refuses to re-cut them; on another size, the weights (module state), LR schedule and
        # client state load and the fp32 master weights are rebuilt from them: Adam moments restart.
        load_optimizer = same_world or stage == 0
        if not load_optimizer:
            log.warning(
                "resuming a %d-rank ZeRO-%d checkpoint on %d ranks: weights and schedule restored, optimizer moments reset",
                saved_world, stage, self.info.world_size,
            )
        local = self.staging / ref.tag
        if self.info.local_rank == 0:
            if local.exists():
                shutil.rmtree(local)
            for f in ref.manifest["files"]:
                dst = local / f["key"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.store.get_file(f"{PREFIX}/{ref.tag}/{f['key']}", str(dst))
        barrier()
        path, client_state = engine.load_checkpoint(
            str(local), tag="ds", load_module_strict=True, load_optimizer_states=load_optimizer, load_lr_scheduler_states=True
        )
        if path is None:
            raise StorageError(f"checkpoint {ref.tag} under {self.store.uri} could not be loaded by DeepSpeed")
        rank_state = None
        rank_file = local / f"rank-{self.info.rank:05d}.pt"
        if same_world and rank_file.exists():
            rank_state = torch.load(rank_file, weights_only=False)
        barrier()
        self._cleanup(local)
        return client_state or {}, rank_state
