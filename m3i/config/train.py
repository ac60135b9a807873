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
    """``fp32``, ``bf16`` or ``fp16`` (mixed precision with loss scaling).

    ``bf16`` and ``fp16`` are DeepSpeed's: the module's weights are held in that dtype, float32
    master weights and optimizer states live in the optimizer, and forward runs without autocast
    on CPU and CUDA alike; the loss statistics (UniGrad's covariance, InfoNCE logits, cross-entropy)
    and positions are computed in float32. ``fp16`` skips a step whose gradients overflow (dynamic
    loss scale); such a step holds the step count, the EMA and the schedule."""

    allow_tf32: bool = True
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa, float32
    range): the float32 parts of a bf16 run, or all of an ``fp32`` run, several times faster on
    Ampere and later. Sets ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    at start; ignored on the CPU. ``false`` keeps IEEE float32."""

    overlap_comm: bool = False
    """ZeRO 1-2: reduce gradient buckets on a side stream while backward goes on (DeepSpeed
    ``zero_optimization.overlap_comm``; ZeRO-3 always overlaps). Costs about 4.5x
    ``reduce_bucket_size`` elements of extra buffer memory. Pointless on a single rank."""

    contiguous_gradients: bool = True
    """ZeRO 1-3: copy gradients into one contiguous buffer as they are produced, avoiding memory
    fragmentation during backward (DeepSpeed ``zero_optimization.contiguous_gradients``)."""

    reduce_bucket_size: int = 500_000_000
    """ZeRO 1-3: gradient elements reduced at once (DeepSpeed
    ``zero_optimization.reduce_bucket_size``). Smaller buckets start communicating earlier in
    backward (more overlap), larger ones use the network better. DeepSpeed's default 5e8 is larger
    than a ViT-B: the default preset uses 5e7."""

    allgather_bucket_size: int = 500_000_000
    """ZeRO 1-2: elements all-gathered at once when the updated parameter shards are shared after
    each step (DeepSpeed ``zero_optimization.allgather_bucket_size``); larger is fewer, fuller
    collectives at the cost of a buffer of that size."""

    seed: int = 0
    """Seed of model initialisation; data order and per-sample draws follow ``data.seed``."""

    max_bad_steps: int = 5
    """Abort after this many NaN/inf losses in a row (each one is skipped and counted)."""

    log_every: int = 10
    """Print a progress line every this many steps (rank 0)."""

    backend: str = "auto"
    """torch.distributed backend: ``auto`` (NCCL on CUDA, gloo on the CPU), ``nccl`` or ``gloo``."""

    device: str = "auto"
    """Where each rank trains: ``cuda`` (GPU ``LOCAL_RANK``; when CUDA is unusable ``m3i train`` exits 1
    before training with one line naming the visible devices, the driver and torch's CUDA version),
    ``cpu`` (GPUs hidden from the rank: gloo, even on a GPU node) or ``auto`` (CUDA when usable, else the
    CPU with a warning where GPUs seem present). ``m3i launch`` sets ``cuda`` when ``launch.gpus_per_node``
    is above 0, else ``cpu``."""

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
        # Below 1e6 elements a bucket is all launch overhead; above 2e9 its buffer alone is 4-8 GB.
        check_range(s, "reduce_bucket_size", self.reduce_bucket_size, 1_000_000, 2_000_000_000)
        check_range(s, "allgather_bucket_size", self.allgather_bucket_size, 1_000_000, 2_000_000_000)
        check_range(s, "max_bad_steps", self.max_bad_steps, 1, MAX_COUNT)
        check_range(s, "log_every", self.log_every, 1, MAX_COUNT)
        check_choice(s, "backend", self.backend, ("auto", "nccl", "gloo"))
        check_choice(s, "device", self.device, ("auto", "cuda", "cpu"))
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("train.backend='nccl' needs CUDA but train.device='cpu'; allowed with cpu: backend auto or gloo")


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
