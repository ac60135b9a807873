"""Config sections of training: ``train`` (engine, optimiser, schedule) and ``checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass

from m3i.config.core import MAX_COUNT, MAX_LR, check_choice, check_positive, check_range

__all__ = ["TrainConfig", "CheckpointConfig"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """How ``m3i train`` optimises: DeepSpeed engine, AdamW, warm-up + cosine schedule."""

    output: str = "m3i-data/run"
    """Run folder or ``s3://`` prefix: checkpoints and the final summary go under it."""

    run_id: str = ""
    """Names the run in metrics and checkpoints; empty derives it from ``output``."""

    steps: int = 1000
    """Optimizer steps in all (the schedules and the EMA momentum run over them)."""

    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank (``data.batch_size`` is the micro-batch)."""

    lr: float = 6.25e-5
    """Peak learning rate at a global batch of 256 images; scaled linearly with the real global batch
    (``lr x batch / 256``, as MAE and SiameseIM's ``--blr``). [sim: ``--blr 6.25e-5`` in
    configs/pretrain/dist_sim_base_1600ep.sh, ViT-B/16, 1e-3 at a batch of 4096; the ``demo`` preset
    uses 2e-3 for 300 steps from scratch]"""

    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""

    warmup_steps: int = 100
    """Linear warm-up steps from 0 to the peak rate. [sim: 40 epochs]"""

    weight_decay: float = 0.05
    """AdamW weight decay, not applied to norms, biases, tokens and position embeddings. [sim: 0.05]"""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas. [sim: beta2 0.95]"""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off). [sim: 1.0]"""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""

    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (mixed precision with loss scaling)."""

    seed: int = 0
    """Seed of model initialisation; data order and per-sample draws follow ``data.seed``."""

    max_bad_steps: int = 5
    """Abort after this many NaN/inf losses in a row (each one is skipped and counted)."""

    log_every: int = 10
    """Print a progress line every this many steps (rank 0)."""

    backend: str = "auto"
    """torch.distributed backend: ``auto`` (NCCL with GPUs, gloo without), ``nccl`` or ``gloo``."""

    init_from: str = ""
    """Backbone weights to start a fresh run from; empty starts from random initialisation.

    Accepts, local or ``s3://``: an ``m3i export`` folder (``config.json`` + ``model.safetensors``),
    one checkpoint (``<output>/checkpoints/step-XXXXXXXX``) or a run's output folder (its latest
    complete checkpoint; the online encoder is read). The weights go into ``model.backbone`` and,
    with the image branch on, into the EMA target's backbone; projector, predictor, heads, text
    encoder, optimizer, schedule and step start fresh. Ignored when the run resumes from its own
    checkpoint (that one wins). The source must be the same timm ViT: depth, width, heads, patch
    size, image size and pooling as this run's ``model`` / ``data.image_size``, else ``ValueError``.
    Recorded as ``init_from`` in each checkpoint's metadata."""

    def __post_init__(self) -> None:
        s = "train"
        if not self.output:
            raise ValueError("train.output='' is not allowed; give a folder or s3://bucket/prefix")
        check_range(s, "steps", self.steps, 1, MAX_COUNT)
        check_range(s, "grad_accum", self.grad_accum, 1, MAX_COUNT)
        check_range(s, "lr", self.lr, 0.0, MAX_LR, lo_open=True)
        check_range(s, "min_lr", self.min_lr, 0.0, MAX_LR)
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}; allowed min_lr <= lr")
        check_range(s, "warmup_steps", self.warmup_steps, 0, MAX_COUNT)
        check_range(s, "weight_decay", self.weight_decay, 0.0, MAX_LR)
        if len(self.betas) != 2:
            raise ValueError(f"train.betas={self.betas!r} must be two numbers")
        for b in self.betas:
            check_range(s, "betas", b, 0.0, 1.0, hi_open=True)
        check_range(s, "grad_clip", self.grad_clip, 0.0)
        check_choice(s, "zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice(s, "precision", self.precision, PRECISIONS)
        check_range(s, "max_bad_steps", self.max_bad_steps, 1, MAX_COUNT)
        check_range(s, "log_every", self.log_every, 1, MAX_COUNT)
        check_choice(s, "backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where checkpoints go; the checkpointer owns this policy."""

    interval_steps: int = 500
    """Save every this many optimizer steps (and always at the end and on SIGTERM)."""

    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one completes."""

    resume: bool = True
    """Resume from the latest complete checkpoint under ``train.output`` at start."""

    staging_dir: str = ""
    """Node-local folder where DeepSpeed writes before upload; empty uses a temp folder."""

    max_consecutive_failures: int = 3
    """Failed saves in a row (storage down past its retries, no room to stage) that training
    survives: each is logged, counted in ``m3i_train_checkpoint_failures_total`` and retried at
    the next interval; this many in a row end the job. The final save must always succeed."""

    def __post_init__(self) -> None:
        check_range("checkpoint", "interval_steps", self.interval_steps, 1, MAX_COUNT)
        check_range("checkpoint", "keep_last", self.keep_last, 1, MAX_COUNT)
        check_range("checkpoint", "max_consecutive_failures", self.max_consecutive_failures, 1, MAX_COUNT)
