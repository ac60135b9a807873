"""``m3i.train.train``: a run put together from its parts, trained, and summed up.

The parts, each with its own policy: the loader (what comes next), the engine and the EMA, the
trainer's state (:mod:`m3i.train.state`), the checkpoint manager (when to save and what a failed
save means, :mod:`m3i.train.checkpointing`), the outputs that take each step's report (metrics,
history, TrainJob status, progress, :mod:`m3i.train.outputs`), and the :class:`Trainer` that
moves batches through the engine (:mod:`m3i.train.trainer`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch

from m3i import __version__
from m3i.artifacts.run import SUMMARY_FILE, TrainSummary
from m3i.config import Config, to_dict
from m3i.data import ShardLoader
from m3i.metrics import build_metrics, push_summary
from m3i.models import build_model
from m3i.models.flops import peak_flops
from m3i.revision import code_revision
from m3i.storage import open_store
from m3i.train.checkpoint import Checkpointer
from m3i.train.checkpointing import CheckpointManager, restore
from m3i.train.dist import DistInfo, init_distributed
from m3i.train.ema import EMAUpdater
from m3i.train.engine import build_engine, configure_float32_matmuls, peak_lr
from m3i.train.history import History
from m3i.train.init_from import init_backbone, init_on_every_rank
from m3i.train.outputs import build_outputs
from m3i.train.state import TrainState
from m3i.train.trainer import Preempted, Trainer, TrainingDiverged
from m3i.transforms import build_transform

__all__ = ["train", "build_trainer", "init_backbone", "TrainSummary", "Preempted", "TrainingDiverged"]

log = logging.getLogger(__name__)


def run_id_of(cfg: Config) -> str:
    return cfg.train.run_id or "run-" + hashlib.sha1(cfg.train.output.encode()).hexdigest()[:10]


def train(cfg: Config, info: DistInfo | None = None, progress: bool = True) -> TrainSummary:
    """Pre-train with M3I until ``cfg.train.steps``, resuming from the latest checkpoint.

    Run one process per device under torchrun (or a single plain process). A fresh run starts
    its backbone from ``train.init_from`` when given. Rank 0 records every optimizer step in
    ``<train.output>/history.jsonl`` (:mod:`m3i.train.history`): lr, every loss part and monitor
    of the model, step and data-wait seconds; written before each checkpoint, at the end, after a
    failure, and at most :data:`m3i.train.history.FLUSH_SECONDS` apart.

    Returns:
        The summary of this rank.

    Raises:
        Preempted: SIGTERM arrived; a complete checkpoint holds the progress.
        TrainingDiverged: ``train.max_bad_steps`` non-finite losses in a row.
        ValueError: A bad config value (also for data that does not fit the config, or a
            ``train.init_from`` whose encoder is not this run's).
        m3i.storage.StorageError: Storage failed after retries: the final checkpoint (at the end
            or on SIGTERM) or ``checkpoint.max_consecutive_failures`` saves in a row were not
            saved (whatever part of a save failed: the history write, staging, an upload, the
            marker), or no checkpoint to resume from verifies. A failed save before that is
            logged, counted and retried at the next interval while training goes on.
        m3i.train.checkpoint.UnsafeCheckpointError: A checkpoint file holds a pickle that
            could run code; nothing of it was loaded.
    """
    t_start = time.monotonic()
    info = info or init_distributed(cfg.train.backend, device=cfg.train.device)
    configure_float32_matmuls(cfg, info.device)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run_id = run_id_of(cfg)
    trainer = build_trainer(cfg, info, run_id, progress=progress)
    trainer.train()
    return _summarise(trainer, run_id, time.monotonic() - t_start)


def build_trainer(cfg: Config, info: DistInfo, run_id: str, *, progress: bool = True) -> Trainer:
    """A rank's trainer, its parts built and, on a resume, restored from the latest checkpoint.

    ``train.init_from`` is loaded before the engine is built (ZeRO partitions what it loads) and
    only on a fresh start; a resume takes the run's own checkpoint.
    """
    loader = ShardLoader(cfg.data, build_transform(cfg, train=True), rank=info.rank, world_size=info.world_size, device=info.device)
    num_classes = cfg.model.num_classes or loader.num_classes
    model = build_model(cfg, num_classes=num_classes)
    checkpointer = Checkpointer(cfg.checkpoint, cfg.train.output, info, run_id)
    ref = checkpointer.latest() if cfg.checkpoint.resume else None
    init_from = None
    if ref is None and cfg.train.init_from:
        init_from = init_on_every_rank(cfg, model, info)
    elif ref is not None and cfg.train.init_from and info.is_main:
        log.info("train.init_from=%r not used: resuming from this run's checkpoint %s", cfg.train.init_from, ref.tag)
    engine, _, scheduler = build_engine(cfg, model, info.world_size)
    ema = EMAUpdater(engine.module, zero3=cfg.train.zero_stage == 3, fp32_master=cfg.train.precision in ("bf16", "fp16"))
    peak = peak_flops(torch.cuda.get_device_name(info.device), cfg.train.precision, cfg.train.allow_tf32) if info.device.type == "cuda" else None
    state = TrainState(loader, info.world_size)
    with ExitStack() as if_this_fails:  # the endpoint and reporter threads must not outlive a failed start
        metrics = build_metrics(cfg.metrics, info.rank, info.local_rank, run_id, world_size=info.world_size, model=cfg.model.backbone, peak_flops=peak)
        if_this_fails.callback(metrics.close)
        if ref is not None:  # falls back to an older checkpoint when this one does not verify
            restored = restore(checkpointer, ref, engine=engine, ema=ema, state=state)
            init_from = (restored.client_state.get("meta") or {}).get("init_from")  # the first attempt's weights stay on record
        history = History(cfg.train.output, resumed_from=state.resumed_from) if info.is_main else None
        outputs = build_outputs(cfg, info.is_main, metrics, history, progress=progress, initial_step=state.step)
        if_this_fails.pop_all()  # from here on the trainer closes them, in its finally
    checkpoints = CheckpointManager(
        checkpointer, cfg.checkpoint, info, engine=engine, ema=ema, state=state, meta=_run_meta(cfg, run_id, num_classes, loader, init_from),
        flush_history=history.flush if history is not None else None, on_save=outputs.on_checkpoint,
    )
    return Trainer(cfg, info, loader=loader, engine=engine, scheduler=scheduler, ema=ema, state=state, checkpoints=checkpoints, outputs=outputs)


def _run_meta(cfg: Config, run_id: str, num_classes: int, loader: ShardLoader, init_from: dict[str, Any] | None) -> dict[str, Any]:
    """The run's facts saved with every checkpoint (client state ``meta`` and ``complete.json``)."""
    return {
        "m3i_version": __version__,
        "code_revision": code_revision(),
        "run_id": run_id,
        "config": to_dict(cfg),
        "num_classes": num_classes,
        "data_index_sha256": loader.index.raw.get("plan_sha256"),
        "inputs_sha256": loader.index.raw.get("inputs_sha256"),
        "init_from": init_from,
    }


def _summarise(trainer: Trainer, run_id: str, seconds: float) -> TrainSummary:
    """The rank's summary; rank 0 writes it as ``summary.json`` and pushes it to ``metrics.pushgateway``."""
    cfg, info, s = trainer.cfg, trainer.info, trainer.state
    summary = TrainSummary(
        run_id=run_id, steps=s.step, resumed_from=s.resumed_from, samples=s.samples, seconds=seconds, skipped_steps=s.skipped,
        last_parts=s.last_parts, checkpoint=trainer.checkpoints.last_uri, data_stats=trainer.loader.stats(),
        overflow_steps=s.overflows, peak_lr=peak_lr(cfg, info.world_size), world_size=info.world_size,
    )
    if info.is_main:
        open_store(cfg.train.output).write_json(SUMMARY_FILE, summary.to_json())
        losses = {k: v for k, v in s.last_parts.items() if k.startswith("loss")}
        pushed = {"steps": s.step, "samples": s.samples, "seconds": seconds, "skipped_steps": s.skipped, "overflow_steps": s.overflows}
        push_summary(cfg.metrics, run_id, info.rank, pushed | losses)
    return summary
