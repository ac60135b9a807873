"""Checkpoints in object storage: atomic, verified, resumable on any world size, pruned.

Layout under ``<train.output>/checkpoints/``::

    step-00000500/ds/...                   DeepSpeed's files (model + EMA target, optimizer shards,
                                           LR scheduler, client state); torch pickles, read weights-only
    step-00000500/rank-00003.safetensors   per-rank state: RNG streams, loader position (JSON in the
                                           header, tensors beside it: nothing in it can run code)
    step-00000500/full/state.safetensors   ZeRO-1/2/3: the optimizer state whole, for a resume on
                                           another world size (see :mod:`m3i.train.reshard`)
    step-00000500/complete.json            written LAST by rank 0, after every rank's upload
                                           succeeded: a checkpoint without it does not exist. It
                                           lists every file with its size and sha256
                                           (see :mod:`m3i.artifacts.checkpoint`)

A save is collective: DeepSpeed writes into a node-local staging folder (after a check that it
has room), the first process of each node hashes and uploads what its node wrote, all ranks
agree that every upload succeeded, and only then does rank 0 write the completion marker and
prune old checkpoints (marker first, so a half-deleted checkpoint is never "complete"). A save
that fails leaves the previous checkpoint the latest, removes its staging files and raises
:class:`StorageError` on every rank. When to save, and whether training goes on after a failed
save, is :class:`m3i.train.checkpointing.CheckpointManager`'s policy.

A resume takes the newest checkpoint that verifies (marker, sizes, then sha256 and allowed
pickle globals of every downloaded file); a newer one that does not is logged with the reason
and skipped.
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

import torch.distributed as dist
from safetensors import SafetensorError

from m3i.config.train import CheckpointConfig
from m3i.storage import StorageError, open_store
from m3i.train import reshard
from m3i.train.dist import DistInfo, all_ok, barrier, broadcast_object
from m3i.artifacts.checkpoint import (
    MARKER,
    PREFIX,
    TAG,
    CheckpointRef,
    manifest_problem,
    scan,
    sha256_of,
    tag_of,
    verify_file,
)
from m3i.artifacts.errors import UnsafeCheckpointError
from m3i.train.safe_state import (
    check_pickle,
    deepspeed_globals,
    load_legacy_rank_state,
    load_state,
    numpy_globals,
    save_state,
    use_weights_only,
)
from m3i.train.staging import free_space, needed_bytes, room_problem

__all__ = [
    "MARKER",
    "PREFIX",
    "Checkpointer",
    "CheckpointRef",
    "Restored",
    "UnsafeCheckpointError",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.load` restored."""

    ref: CheckpointRef
    """The checkpoint loaded: the one asked for, or an older one when that one did not verify."""

    client_state: dict[str, Any]
    """The client state saved with it (``step``, ``loader``, ``ema``, ``meta``)."""

    rank_state: dict[str, Any] | None
    """This rank's RNG streams and loader position; ``None`` when another world size wrote it."""


def rank_file(rank: int) -> str:
    """The key of rank ``rank``'s state inside a checkpoint folder."""
    return f"rank-{rank:05d}.safetensors"


def _legacy_rank_file(rank: int) -> str:
    # Checkpoints written before rank state became JSON + safetensors pickled it.
    return f"rank-{rank:05d}.pt"


# -- the checkpointer ------------------------------------------------------------------------


def _gather_to_all(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
        """The step of the last checkpoint this checkpointer saved or loaded."""
        self._last_staged_bytes: int | None = None

    def uri_of(self, step: int) -> str:
        """The URI of checkpoint ``step``."""
        return f"{self.store.uri}/{PREFIX}/{tag_of(step)}"

    # -- save ---------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> float:
        """Collectively save a checkpoint of ``step``; returns the seconds it took.

        Raises:
            StorageError: On every rank when the save failed (no room in the staging folder, a
                write, an upload or the marker failed); the previous checkpoint stays the latest
                and the staging files are removed.
        """
        t0 = time.monotonic()
        tag = tag_of(step)
        local = self.staging / tag
        try:
            self._save(engine, step, tag, local, client_state, rank_state)
        finally:
            barrier()
            self._cleanup(local)
        self.last_saved_step = step
        return time.monotonic() - t0

    def _save(self, engine, step: int, tag: str, local: Path, client_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        err = ""
        if self.info.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            err = room_problem(self.staging, needed_bytes(engine, self.info, self._last_staged_bytes))
        if self.info.is_main and not err:
            # A damaged checkpoint of this step that a resume skipped: its old marker must not
            # vouch for the files about to replace its own.
            try:
                self.store.delete(f"{PREFIX}/{tag}/{MARKER}")
            except StorageError as e:
                err = f"removing the old {MARKER} of {tag} failed: {e}"
        if not all_ok(not err):
            raise StorageError(f"checkpoint {tag} not saved: {err or 'no room on another node'}")
        try:
            engine.save_checkpoint(str(local), tag="ds", client_state=client_state, save_latest=False)
            save_state(rank_state, local / rank_file(self.info.rank))
            if reshard.applies(engine):
                reshard.save_full_state(engine, local / reshard.FILE, client_state, self.info.is_main)
        except (OSError, RuntimeError, SafetensorError) as e:
            # A full disk reaches here as torch.save's RuntimeError ("unexpected pos"), as safetensors'
            # SafetensorError or as an OSError with no file name: the folder and its free space say which disk.
            err = f"writing its files to the staging folder {local} failed ({free_space(local)}): {e}"
            log.error("checkpoint %s: %s", tag, err)
        if not all_ok(not err):
            raise StorageError(f"checkpoint {tag} not saved: {err or 'writing failed on another rank'}")
        files: list[dict[str, Any]] = []
        if self.info.local_rank == 0:
            try:
                files = self._upload(local, f"{PREFIX}/{tag}")
            except (StorageError, OSError) as e:
                err = f"upload from node {self.info.node_rank} failed: {e}"
                log.error("checkpoint %s: %s", tag, err)
        if not all_ok(not err):
            raise StorageError(f"checkpoint {tag} was not completed: {err or 'an upload failed on another node'}")
        merged = {}
        for node_files in _gather_to_all(files):
            for f in node_files:
                merged.setdefault(f["key"], f)
        if self.info.is_main:
            err = self._publish(tag, step, sorted(merged.values(), key=lambda f: f["key"]), client_state)
        if not all_ok(not err):
            raise StorageError(f"checkpoint {tag} was not completed: {err or 'writing the marker failed on rank 0'}")
        if self.info.local_rank == 0:
            self._last_staged_bytes = sum(f["bytes"] for f in files)

    def _upload(self, local: Path, prefix: str) -> list[dict[str, Any]]:
        """Hash and upload every staged file of this node; returns their manifest entries."""
        files = []
        for path in sorted(local.rglob("*")):
            if path.is_file():
                key = path.relative_to(local).as_posix()
                entry = {"key": key, "bytes": path.stat().st_size, "sha256": sha256_of(path)}
                self.store.put_file(f"{prefix}/{key}", str(path), {"sha256": entry["sha256"]})
                files.append(entry)
        return files

    def _publish(self, tag: str, step: int, files: list[dict[str, Any]], client_state: dict[str, Any]) -> str:
        """Rank 0: check the uploads against a listing, write the marker, prune. Returns why it failed, or ``""``."""
        prefix = f"{PREFIX}/{tag}/"
        try:
            sizes = {o.key[len(prefix) :]: o.size for o in self.store.list(prefix)}
            manifest = {
                "step": step,
                "world_size": self.info.world_size,
                "files": files,
                "created_unix": int(time.time()),
                **client_state.get("meta", {}),
            }
            why = manifest_problem(manifest, tag, sizes)
            if why:
                return f"the store does not hold what was uploaded: {why}"
            self.store.write_manifest(prefix + MARKER, manifest)
        except (StorageError, OSError) as e:
            log.error("checkpoint %s: writing %s failed: %s", tag, MARKER, e)
            return f"writing {MARKER} failed: {e}"
        try:
            self._prune()
        except (StorageError, OSError) as e:  # the checkpoint is complete; old ones go next time
            log.warning("checkpoint %s is complete, but pruning old checkpoints failed: %s", tag, e)
        return ""

    def _cleanup(self, local: Path) -> None:
        if self.info.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)

    def _prune(self) -> None:
        refs, _, listing = scan(self.store)
        for ref in refs[: max(0, len(refs) - self.cfg.keep_last)]:
            prefix = f"{PREFIX}/{ref.tag}/"
            self.store.delete(prefix + MARKER)  # first: it stops being a checkpoint at once
            for obj in self.store.list(prefix):
                self.store.delete(obj.key)
        # Older than the latest intact checkpoint and not one: a crash mid-upload, or damaged.
        if refs:
            newest = refs[-1].step
            intact = {r.tag for r in refs}
            for obj in listing:
                parts = obj.key.split("/")
                m = TAG.match(parts[1]) if len(parts) > 2 else None
                if m and parts[1] not in intact and int(m.group(1)) < newest:
                    self.store.delete(obj.key)

    # -- load ---------------------------------------------------------------

    def latest(self) -> CheckpointRef | None:
        """The newest complete checkpoint that verifies from the listing, as rank 0 sees it, on every rank.

        Raises:
            StorageError: When checkpoints claim completion but none verifies: starting over
                would silently throw away the run's progress.
        """
        ref, err = None, ""
        if self.info.is_main:
            refs, skipped, _ = scan(self.store)
            for tag, why in skipped:
                log.warning("checkpoint %s/%s/%s skipped: %s", self.store.uri, PREFIX, tag, why)
            ref = refs[-1] if refs else None
            if ref is None and skipped:
                err = (
                    f"{len(skipped)} checkpoint(s) under {self.store.uri}/{PREFIX} claim completion but none verifies "
                    f"({'; '.join(f'{t}: {w}' for t, w in skipped[-3:])}); delete them, or set checkpoint.resume=false "
                    "to start over"
                )
        ref, err = broadcast_object((ref, err))
        if err:
            raise StorageError(err)
        return ref

    def load(self, engine, ref: CheckpointRef) -> Restored:
        """Restore ``engine`` from ``ref``, or from the newest older checkpoint when ``ref``'s files do not verify.

        Every file is downloaded and checked against its size and sha256, and every torch pickle
        against the allowed globals, before anything is loaded; DeepSpeed then reads its files
        weights-only. On the saved world size everything is restored exactly. On another one,
        ZeRO-0 restores everything but the RNG streams and the exact data order, and ZeRO-1/2/3
        also restore the optimizer (float32 master weights, Adam moments and step) from the
        checkpoint's world-size-independent copy; a ZeRO-1/2 checkpoint without that copy
        (written before it existed) restarts the Adam moments, a ZeRO-3 one is refused.

        Raises:
            StorageError: When no checkpoint from ``ref`` down verifies.
            UnsafeCheckpointError: When a file holds a pickle that could run code, or is not
                the format it claims; nothing of it was loaded.
            ValueError: A ZeRO-3 checkpoint without a world-size-independent copy on another world size.
        """
        ref = self._fetch(ref)
        local = self.staging / ref.tag
        try:
            rank_state = self._read_rank_state(ref, local)
            use_weights_only(engine)
            client_state = self._restore(engine, ref, local)
        finally:
            barrier()
            self._cleanup(local)
        self.last_saved_step = ref.step  # saving the same step again would rewrite a complete checkpoint in place
        return Restored(ref, client_state, rank_state)

    def _fetch(self, ref: CheckpointRef) -> CheckpointRef:
        """Download ``ref`` (or the newest older checkpoint that verifies) to each node's staging folder."""
        candidates = [ref]
        if self.info.is_main:
            intact, _, _ = scan(self.store)  # the skipped ones were logged by latest()
            candidates += [r for r in reversed(intact) if r.step < ref.step]
        candidates = broadcast_object(candidates)
        skipped = []
        for cand in candidates:
            local = self.staging / cand.tag
            damage, unsafe, failed = "", "", ""
            if self.info.local_rank == 0:
                try:
                    damage = self._download(cand, local)
                    if not damage:
                        self._check_pickles(cand, local)
                except UnsafeCheckpointError as e:
                    unsafe = str(e)
                except (StorageError, OSError) as e:  # storage down: an older checkpoint would lose progress for nothing
                    failed = str(e)
            if not all_ok(not unsafe):
                self._cleanup(local)
                raise UnsafeCheckpointError(f"checkpoint {self.store.uri}/{PREFIX}/{cand.tag}: {unsafe or 'a file was refused on another node'}")
            if not all_ok(not failed):
                self._cleanup(local)
                raise StorageError(f"checkpoint {cand.tag}: download failed: {failed or 'on another node'}")
            if all_ok(not damage):
                if skipped and self.info.is_main:
                    log.warning("resuming from %s instead of %s", cand.tag, ref.tag)
                return cand
            self._cleanup(local)
            if self.info.is_main or damage:
                log.warning("checkpoint %s/%s/%s skipped: %s", self.store.uri, PREFIX, cand.tag, damage or "damaged on another node")
            skipped.append(f"{cand.tag}: {damage or 'damaged on another node'}")
        raise StorageError(
            f"no checkpoint under {self.store.uri}/{PREFIX} from {ref.tag} down verifies ({'; '.join(skipped[:3])}); "
            "delete the damaged ones, or set checkpoint.resume=false to start over"
        )

    def _download(self, ref: CheckpointRef, local: Path) -> str:
        if local.exists():
            shutil.rmtree(local)
        for f in ref.manifest["files"]:
            dst = local / f["key"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.store.get_file(f"{PREFIX}/{ref.tag}/{f['key']}", str(dst))
            why = verify_file(dst, f)
            if why:
                return why
        return ""

    def _check_pickles(self, ref: CheckpointRef, local: Path) -> None:
        ds = deepspeed_globals()
        for f in ref.manifest["files"]:
            if f["key"].endswith(".pt"):
                check_pickle(local / f["key"], ds if f["key"].startswith("ds/") else numpy_globals())

    def _read_rank_state(self, ref: CheckpointRef, local: Path) -> dict[str, Any] | None:
        """This rank's state when ``ref`` was written by this world size (all ranks refuse together)."""
        if int(ref.manifest.get("world_size", self.info.world_size)) != self.info.world_size:
            return None
        keys = {f["key"] for f in ref.manifest["files"]}
        state, err = None, ""
        try:
            if rank_file(self.info.rank) in keys:
                state = load_state(local / rank_file(self.info.rank))
            elif _legacy_rank_file(self.info.rank) in keys:
                state = load_legacy_rank_state(local / _legacy_rank_file(self.info.rank))
        except UnsafeCheckpointError as e:
            err = str(e)
        if not all_ok(not err):
            raise UnsafeCheckpointError(err or f"checkpoint {ref.tag}: a rank file was refused on another rank")
        return state

    def _restore(self, engine, ref: CheckpointRef, local: Path) -> dict[str, Any]:
        """Load the engine from the downloaded ``ref``; returns the client state."""
        saved_world = int(ref.manifest.get("world_size", self.info.world_size))
        stage = engine.zero_optimization_stage()
        full = reshard.FILE in {f["key"] for f in ref.manifest["files"]}
        if saved_world == self.info.world_size or stage == 0:
            return self._deepspeed_load(engine, ref, local, optimizer=True)
        if self.info.is_main:
            log.info("resuming a %d-rank ZeRO-%d checkpoint on %d ranks", saved_world, stage, self.info.world_size)
        if full and stage == 3:  # DeepSpeed loads no part of a ZeRO-3 checkpoint on another world size
            return reshard.load_full_state(engine, local / reshard.FILE, load_module=True)
        if full:
            client = self._deepspeed_load(engine, ref, local, optimizer=False)
            reshard.load_full_state(engine, local / reshard.FILE, load_module=False)
            return client
        if stage == 3:
            raise ValueError(
                f"checkpoint {ref.tag} was written by {saved_world} ranks with train.zero_stage=3 before checkpoints "
                f"had a world-size-independent copy; it resumes only on {saved_world} ranks (this job has {self.info.world_size})"
            )
        log.warning(
            "checkpoint %s predates world-size-independent optimizer state: weights and schedule restored, Adam moments reset",
            ref.tag,
        )
        return self._deepspeed_load(engine, ref, local, optimizer=False)

    def _deepspeed_load(self, engine, ref: CheckpointRef, local: Path, optimizer: bool) -> dict[str, Any]:
        path, client_state = engine.load_checkpoint(
            str(local), tag="ds", load_module_strict=True, load_optimizer_states=optimizer, load_lr_scheduler_states=True
        )
        if path is None:
            raise StorageError(f"checkpoint {ref.tag} under {self.store.uri} could not be loaded by DeepSpeed")
        return client_state or {}
