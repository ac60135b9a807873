"""The training loop: it composes the parts (loader, engine, EMA, checkpointer, metrics, history).

Each part owns its policy: the checkpointer decides when to save, the metrics when
to export, the history when to write, the loader what comes next. The loop only moves
batches through the engine.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from m3i import __version__
from m3i.artifacts.run import SUMMARY_FILE, TrainSummary
from m3i.config import Config, to_dict
from m3i.data import ShardLoader
from m3i.models import build_model, ema_momentum
from m3i.models.flops import StepFlopCounter, peak_flops
from m3i.revision import code_revision
from m3i.storage import StorageError, open_store
from m3i.train.checkpoint import Checkpointer
from m3i.train.dist import DistInfo, all_ok, init_distributed
from m3i.train.ema import EMAUpdater
from m3i.train.engine import build_engine, configure_float32_matmuls, peak_lr
from m3i.train.history import History
from m3i.train.preemption import SigTerm
from m3i.train.progress import build_trainer_status
from m3i.transforms import build_transform

__all__ = ["train", "init_backbone", "TrainSummary", "Preempted", "TrainingDiverged"]

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """SIGTERM arrived; a complete checkpoint was saved. Exit 143 so a restart policy retries."""

    exit_code = 143


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; nothing was saved after the first of them."""


def run_id_of(cfg: Config) -> str:
    return cfg.train.run_id or "run-" + hashlib.sha1(cfg.train.output.encode()).hexdigest()[:10]


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


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """The loader's batch as model input: uint8 views normalised on ``device``, floats in ``dtype``."""
    from m3i.data import to_device  # the one place images are normalised (ImageNet mean/std, as the transforms assume)

    return to_device(batch, device, dtype)


def _vit_facts(vit: torch.nn.Module) -> dict[str, Any]:
    """What makes two timm ViTs the same encoder, beyond their state dicts' keys and shapes."""
    return {
        "depth": len(vit.blocks),
        "width": int(vit.embed_dim),
        "heads": int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 0,
        "patch size": tuple(vit.patch_embed.patch_size),
        "image size": tuple(vit.patch_embed.img_size),
        "global pool": vit.global_pool,
    }


def init_backbone(cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    """Load ``cfg.train.init_from``'s encoder into ``model.backbone`` (and the EMA target's backbone).

    Call it before :func:`m3i.train.engine.build_engine`, so that ZeRO partitions the loaded weights.
    Everything else in ``model`` is left as initialised.

    Args:
        cfg: The run config; ``train.init_from`` names an ``m3i export`` folder, a checkpoint or a
            run's output folder, local or ``s3://``.
        model: The freshly built :class:`m3i.models.M3IModel`.

    Returns:
        What was loaded, for the checkpoint metadata: ``uri``, ``kind`` (``exported`` or
        ``checkpoint``), ``name``, ``step`` and ``modules`` (the model's submodules overwritten).

    Raises:
        ValueError: When ``train.init_from`` holds no export, checkpoint or run, or its encoder is
            not this run's (the message lists what differs).
        m3i.storage.StorageError: When storage fails after retries.
    """
    from m3i.artifacts.checkpoint import MARKER as CHECKPOINT_MARKER
    from m3i.artifacts.checkpoint import find_latest
    from m3i.artifacts.export import CONFIG as EXPORT_CONFIG
    from m3i.artifacts.export import WEIGHTS as EXPORT_WEIGHTS
    from m3i.models.pretrained import load_encoder

    uri = cfg.train.init_from
    store = open_store(uri)
    # load_encoder's own refusal names evaluate.model; check here to name the field the user set.
    if not (store.exists(EXPORT_CONFIG) and store.exists(EXPORT_WEIGHTS)) and not store.exists(CHECKPOINT_MARKER) and find_latest(store.uri) is None:
        raise ValueError(
            f"train.init_from={uri!r} holds neither an m3i export ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}), one checkpoint "
            f"({CHECKPOINT_MARKER}) nor a run output with a complete checkpoint"
        )
    enc = load_encoder(store.uri)
    source = enc.module.state_dict()
    want = model.backbone.state_dict()
    facts_src, facts_run = _vit_facts(enc.module), _vit_facts(model.backbone)
    differ = [f"{k} {facts_src[k]} != {facts_run[k]}" for k in facts_run if facts_src[k] != facts_run[k]]
    missing, extra = sorted(set(want) - set(source)), sorted(set(source) - set(want))
    shapes = [f"{k} {tuple(source[k].shape)} != {tuple(v.shape)}" for k, v in want.items() if k in source and source[k].shape != v.shape]
    if differ or missing or extra or shapes:
        raise ValueError(
            f"train.init_from={uri!r} ({enc.kind}, {enc.info.get('architecture', '?')}) does not fit this run's backbone "
            f"(model.backbone={cfg.model.backbone!r}, model.patch_size={cfg.model.patch_size}, "
            f"data.image_size={cfg.data.image_size}, model.global_pool={cfg.model.global_pool!r}): source != run: "
            + "; ".join(differ + ([f"missing keys {missing[:5]}"] if missing else []) + ([f"unexpected keys {extra[:5]}"] if extra else []) + shapes[:5])
        )
    targets = {"backbone": model.backbone}
    if getattr(model, "use_img", False):
        targets["target.backbone"] = model.target.backbone
    for module in targets.values():
        module.load_state_dict(source, strict=True)
    return {"uri": enc.uri, "kind": enc.kind, "name": enc.name, "step": enc.step, "modules": list(targets)}


def _init_on_every_rank(cfg: Config, model: torch.nn.Module, info: DistInfo) -> dict[str, Any]:
    """:func:`init_backbone` on each rank; all ranks fail together, so none waits in a collective for a failed peer."""
    err: Exception | None = None
    loaded: dict[str, Any] = {}
    try:
        loaded = init_backbone(cfg, model)
    except (ValueError, StorageError, OSError) as e:
        err = e
    if not all_ok(err is None):
        raise err or StorageError(f"train.init_from={cfg.train.init_from!r}: loading failed on another rank")
    if info.is_main:
        log.info(
            "train.init_from: %s loaded from %s %s (%s, step %s); the rest of the model starts fresh",
            " and ".join(loaded["modules"]), loaded["kind"], loaded["uri"], loaded["name"], loaded["step"],
        )
    return loaded


def _flush_before_checkpoint(history: History | None, step: int) -> None:
    """Write the history before checkpoint ``step`` (collective): a checkpoint's steps are always in it.

    Raises:
        StorageError: On every rank when rank 0 could not write it; the checkpoint is then not
            saved and the previous one stays the latest, as after a failed upload.
    """
    err = ""
    if history is not None:
        try:
            history.flush()
        except (StorageError, OSError) as e:
            err = str(e)
    if not all_ok(not err):
        raise StorageError(f"checkpoint step {step} not saved: writing history.jsonl failed ({err or 'on rank 0'})")


def _flush_quietly(history: History) -> None:
    """Best effort after a failure: the curve up to it helps to see why; the original error matters more."""
    try:
        history.flush()
    except (StorageError, OSError) as e:
        log.error("history: could not write %d pending rows: %s", history.pending, e)


def _sync_micro_batch(loss: torch.Tensor, parts: dict[str, torch.Tensor] | None, sigterm: bool) -> tuple[bool, bool, dict[str, float]]:
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
            saved, or no checkpoint to resume from verifies. A failed save before that is
            logged, counted and retried at the next interval while training goes on.
        m3i.train.checkpoint.UnsafeCheckpointError: A checkpoint file holds a pickle that
            could run code; nothing of it was loaded.
    """
    from m3i.metrics import StepReport, build_metrics

    t_start = time.monotonic()
    info = info or init_distributed(cfg.train.backend, device=cfg.train.device)
    run_id = run_id_of(cfg)
    configure_float32_matmuls(cfg, info.device)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    loader = ShardLoader(cfg.data, build_transform(cfg, train=True), rank=info.rank, world_size=info.world_size, device=info.device)
    num_classes = cfg.model.num_classes or loader.num_classes
    model = build_model(cfg, num_classes=num_classes)
    ckpt = Checkpointer(cfg.checkpoint, cfg.train.output, info, run_id)
    ref = ckpt.latest() if cfg.checkpoint.resume else None
    init_from = None
    if ref is None and cfg.train.init_from:
        init_from = _init_on_every_rank(cfg, model, info)
    elif ref is not None and cfg.train.init_from and info.is_main:
        log.info("train.init_from=%r not used: resuming from this run's checkpoint %s", cfg.train.init_from, ref.tag)
    engine, _, scheduler = build_engine(cfg, model, info.world_size)
    module = engine.module
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    ema = EMAUpdater(module, zero3=cfg.train.zero_stage == 3, fp32_master=dtype is not None)
    peak = peak_flops(torch.cuda.get_device_name(info.device), cfg.train.precision, cfg.train.allow_tf32) if info.device.type == "cuda" else None
    metrics = build_metrics(cfg.metrics, info.rank, info.local_rank, run_id, world_size=info.world_size, model=cfg.model.backbone, peak_flops=peak)

    step, resumed_from = 0, None
    last_ckpt = None
    if ref is not None:
        restored = ckpt.load(engine, ref)  # falls back to an older checkpoint when this one does not verify
        ref, client, rank_state = restored.ref, restored.client_state, restored.rank_state
        step = resumed_from = int(client["step"])
        last_ckpt = ckpt.uri_of(ref.step)
        init_from = (client.get("meta") or {}).get("init_from")  # the first attempt's weights stay on record
        ema.load_state_dict(client.get("ema", {}))
        if rank_state is not None:
            loader.load_state_dict(rank_state["loader"])
            _set_rng_state(rank_state["rng"])
        else:  # another world size: same epoch, the same share of it done
            old = client["loader"]
            loader.epoch = int(old["epoch"])
            loader.consumed = min(loader.batches_per_epoch, int(old["batches_consumed"]) * int(old["world_size"]) // info.world_size)
            log.warning("resumed on %d ranks from a %d-rank checkpoint: data order continues approximately", info.world_size, old["world_size"])
        if info.is_main:
            log.info("resumed from %s at step %d", ckpt.uri_of(ref.step), step)

    meta = {"m3i_version": __version__, "code_revision": code_revision(), "run_id": run_id, "config": to_dict(cfg), "num_classes": num_classes, "data_index_sha256": loader.index.raw.get("plan_sha256"), "inputs_sha256": loader.index.raw.get("inputs_sha256"), "init_from": init_from}
    history = History(cfg.train.output, resumed_from=resumed_from) if info.is_main else None

    def save(at: int, final: bool = False) -> str | None:
        """Checkpoint ``at``; the URI, or ``None`` when it failed and training may go on.

        A failed save (storage down past its retries, no room to stage) leaves the previous
        checkpoint the latest and is retried at the next interval; ``final`` saves (the end,
        SIGTERM) and the ``checkpoint.max_consecutive_failures``-th failure in a row raise.
        """
        nonlocal last_save_seconds
        t0 = time.monotonic()
        try:
            _flush_before_checkpoint(history, at)
            client = {"step": at, "loader": loader.state_dict(), "ema": ema.state_dict(), "meta": meta}
            rank_state = {"loader": loader.state_dict(), "rng": _rng_state()}
            seconds = ckpt.save(engine, at, client, rank_state)
        except StorageError as e:
            metrics.on_checkpoint(time.monotonic() - t0, False)
            if final or ckpt.give_up:
                raise
            if info.is_main:
                log.error(
                    "checkpoint step %d failed (%d in a row, checkpoint.max_consecutive_failures=%d); training goes on "
                    "and retries at the next interval: %s", at, ckpt.failures_in_a_row, cfg.checkpoint.max_consecutive_failures, e,
                )
            return None
        metrics.on_checkpoint(seconds, True)
        last_save_seconds = time.monotonic() - t0
        if info.is_main:
            log.info("checkpoint step %d saved in %.1fs", at, seconds)
        return ckpt.uri_of(at)

    def preempted() -> Preempted:
        """Save ``step`` for SIGTERM (unless it is saved already) within the grace period as far as it can tell."""
        nonlocal last_ckpt
        if ckpt.last_saved_step != step:
            if info.is_main:
                sigterm.before_save(step, last_save_seconds)
            t0 = time.monotonic()
            last_ckpt = save(step, final=True)
            if info.is_main:
                sigterm.after_save(step, time.monotonic() - t0)
        return Preempted(f"SIGTERM at step {step}; checkpoint {last_ckpt} is complete")

    trainer_status = build_trainer_status(cfg.metrics, info.is_main)  # None outside a Kubeflow TrainJob
    last_save_seconds: float | None = None  # of the last successful save, for the SIGTERM deadline
    sigterm = SigTerm()
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", disable=not (progress and info.is_main))
    samples = skipped = overflows = bad_streak = micro = 0
    last: dict[str, float] = {}
    global_samples = cfg.data.batch_size * info.world_size
    micro_flops: int | None = None  # model FLOPs of one micro-batch on this rank, counted on the first one
    t_first = wait = 0.0  # start of the step's first micro-batch; data wait summed over its micro-batches
    try:
        while step < cfg.train.steps:
            t_wait = time.monotonic()
            for batch in loader:
                t0 = time.monotonic()
                if micro % cfg.train.grad_accum == 0:
                    t_first, wait = t0, 0.0
                wait += t0 - t_wait
                batch = _to_device(batch, info.device, dtype)
                boundary = (micro + 1) % cfg.train.grad_accum == 0
                counter = StepFlopCounter() if micro_flops is None else nullcontext()
                with counter:
                    # No autocast, on CPU and CUDA alike: DeepSpeed's bf16/fp16 engine holds the weights in
                    # that dtype and the model casts its own inputs (on CUDA DeepSpeed would turn an outer
                    # autocast off inside the engine anyway). The loss statistics are float32 by themselves.
                    parts = engine(batch)
                    loss = parts["loss"]
                    finite, no_sigterm, host = _sync_micro_batch(loss, parts if boundary else None, sigterm.received)
                    if finite:
                        engine.backward(loss)
                if not finite:
                    skipped += 1
                    bad_streak += 1
                    metrics.on_skipped_step()
                    log.warning("step %d: non-finite loss on some rank; skipped (%d in a row)", step, bad_streak)
                    if bad_streak >= cfg.train.max_bad_steps:
                        raise TrainingDiverged(
                            f"{bad_streak} non-finite losses in a row at step {step} (train.max_bad_steps="
                            f"{cfg.train.max_bad_steps}); the last complete checkpoint is untouched. "
                            "Lower train.lr, raise train.warmup_steps, or check the data."
                        )
                    t_wait = time.monotonic()
                    continue
                if micro_flops is None:
                    micro_flops = counter.total
                bad_streak = 0
                lr = scheduler.get_last_lr()[0]  # the rate this optimizer step applies; engine.step() moves the schedule on
                engine.step()
                micro += 1
                samples += global_samples
                if not boundary:
                    t_wait = time.monotonic()
                    continue
                if not engine.was_step_applied():
                    # DeepSpeed skipped the update (fp16 overflow, or inf/NaN gradients in bf16) and held its
                    # schedule; the step count and the EMA hold with it, and the next batch retries the step.
                    overflows += 1
                    metrics.on_overflow_step()
                    if info.is_main:
                        log.warning("step %d: gradients overflowed; DeepSpeed skipped the update (%d so far)", step + 1, overflows)
                    if not no_sigterm:
                        raise preempted()
                    t_wait = time.monotonic()
                    continue
                step += 1
                m = ema_momentum(step, cfg.train.steps, cfg.model.ema_m0)
                ema.step(m)
                last = host
                branches = {b: int(last.get(f"n_{b}", 0)) * cfg.train.grad_accum for b in ("img", "cls", "txt")}
                seconds = time.monotonic() - t_first
                metrics.on_step(StepReport(step, cfg.train.steps, last, lr, global_samples * cfg.train.grad_accum, seconds, wait, time.time(), branches, micro_flops * cfg.train.grad_accum, loader.stats()))
                if history is not None:
                    history.append({"step": step, "time": time.time(), "lr": lr, **last, "step_seconds": seconds, "data_wait_seconds": wait})
                    history.flush_if_due()
                if trainer_status is not None:
                    trainer_status.on_step(step, cfg.train.steps, last)
                bar.update(1)
                if info.is_main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img=f"{last['loss_img']:.3f}", cls=f"{last['loss_cls']:.3f}", txt=f"{last['loss_txt']:.3f}")
                    if not progress:
                        log.info("step %d/%d loss %.4f (img %.4f cls %.4f txt %.4f) lr %.2e", step, cfg.train.steps, last["loss"], last["loss_img"], last["loss_cls"], last["loss_txt"], lr)
                if not no_sigterm:
                    raise preempted()
                if ckpt.due(step) or step == cfg.train.steps:
                    last_ckpt = save(step, final=step >= cfg.train.steps) or last_ckpt
                if step >= cfg.train.steps:
                    break
                t_wait = time.monotonic()
        if ckpt.last_saved_step != step:
            last_ckpt = save(step, final=True)
    finally:
        bar.close()
        sigterm.restore()
        if trainer_status is not None:  # sends the last queued update: 100 % after the final step
            trainer_status.close()
        if history is not None and history.pending:  # only after a failure: every save flushed before it
            _flush_quietly(history)

    summary = TrainSummary(
        run_id, step, resumed_from, samples, time.monotonic() - t_start, skipped, last, last_ckpt, loader.stats(), overflows,
        peak_lr(cfg, info.world_size), info.world_size,
    )
    if info.is_main:
        open_store(cfg.train.output).write_json(SUMMARY_FILE, summary.to_json())
        metrics.push_summary({"steps": step, "samples": samples, "seconds": summary.seconds, "skipped_steps": skipped, "overflow_steps": overflows, **{k: v for k, v in last.items() if k.startswith("loss")}})
    metrics.close()
    return summary
