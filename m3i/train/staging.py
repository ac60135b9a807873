"""The node-local staging folder a checkpoint is written to before upload: is there room, and how much is there.

DeepSpeed writes a checkpoint whole before anything is uploaded, so a save first checks that
the folder can hold it (the last save's size, else an estimate from the model) and a failed
write names the folder and its free space: a full disk says which disk.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from m3i.train import reshard
from m3i.train.dist import DistInfo

__all__ = ["free_space", "needed_bytes", "room_problem"]

log = logging.getLogger(__name__)


def free_space(folder: Path) -> str:
    """``N bytes free there`` for the disk of ``folder`` (or its nearest existing parent), for an error message."""
    for p in (folder, *folder.parents):
        try:
            return f"{shutil.disk_usage(p).free} bytes free there"
        except OSError:
            continue
    return "free space unknown"


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves p.numel() at 0


def room_problem(staging: Path, need: int) -> str:
    """Why ``staging`` cannot take ``need`` bytes (a message naming folder, free and needed bytes); ``""`` if it can."""
    try:
        staging.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(staging).free
    except OSError as e:
        log.error("checkpoint: staging folder %s: %s", staging, e)
        return f"the staging folder {staging} is not usable: {e}"
    if free < need:
        msg = (
            f"the staging folder {staging} has {free} bytes free, the checkpoint needs about {need} bytes "
            "(set checkpoint.staging_dir to a larger node-local disk)"
        )
        log.error("checkpoint: %s", msg)
        return msg
    return ""


def needed_bytes(engine, info: DistInfo, last_staged_bytes: int | None) -> int:
    """What this node's staging folder must hold: the last save's size, else an estimate, plus a margin."""
    if last_staged_bytes is not None:
        return int(last_staged_bytes * 1.1)
    params = list(engine.module.parameters())
    total = sum(_numel(p) for p in params)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    weights = sum(_numel(p) * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in engine.module.buffers())
    # fp32 master + Adam's two moments; the EMA master (float32 copy of the frozen target);
    # and the world-size-independent copy of ZeRO-1/2/3 (the same again, plus frozen weights).
    need = weights + 12 * trainable + 4 * (total - trainable)
    if reshard.applies(engine):
        need += 12 * trainable + 8 * (total - trainable)
    if info.node_rank != 0:  # rank 0's node writes the unpartitioned files
        need = need * info.local_world_size // max(1, info.world_size)
    return int(need * 1.1)
