"""The DeepSpeed engine from our config: ZeRO stage, precision, AdamW, warm-up + cosine."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
from types import ModuleType
from typing import Any

import torch
from torch import nn

from m3i.config import Config
from m3i.models.groups import param_groups

__all__ = [
    "SHM_COMM_OP",
    "avoid_jit_ops",
    "build_engine",
    "configure_float32_matmuls",
    "deepspeed_config",
    "lr_lambda",
    "param_groups",
    "peak_lr",
]

SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's shared-memory collectives op (``ShareMemCommBuilder``) on its CPU accelerator."""


def _mark_shm_op_unavailable(ops: ModuleType) -> None:
    compatible = vars(ops).get("__compatible_ops__")
    if compatible is None:
        # Not probed yet; probing compiles test programs with gcc. The one reader,
        # deepspeed.comm.torch.build_shm_op, looks the op up with .get(name, False).
        ops.__compatible_ops__ = {SHM_COMM_OP: False}
    else:
        compatible[SHM_COMM_OP] = False


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``action(module)`` right after ``name`` is imported, then leaves ``sys.meta_path``."""

    def __init__(self, name: str, action) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, action = spec.loader.exec_module, self.action

        def exec_module(module: ModuleType) -> None:
            run(module)
            action(module)

        spec.loader.exec_module = exec_module
        return spec


def avoid_jit_ops() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory op when it sets up torch.distributed.

    DeepSpeed's communication backend builds ``deepspeed_shm_comm`` with a C++ compiler
    whenever the accelerator offers it (the CPU accelerator does) and it is not prebuilt:
    35 s or more on a fresh machine, under a file lock in ``TORCH_EXTENSIONS_DIR`` that
    makes parallel starts wait on each other, and impossible without a compiler. The op
    only serves DeepSpeed's ``inference_all_reduce``; training's collectives go through
    torch.distributed (gloo) with or without it, so it is marked unavailable. Our AdamW
    is torch's (see :func:`deepspeed_config`), so no other op is built. GPU runs are not
    affected: the CUDA accelerator has no such op.

    The op is looked up in :func:`m3i.train.dist.init_distributed`, before the engine is
    built, and importing DeepSpeed early would fix its accelerator before that function
    chooses it; so when DeepSpeed is not loaded yet this marks the op the moment
    ``deepspeed.ops`` is imported. Idempotent.
    """
    ops = sys.modules.get("deepspeed.ops")
    if ops is not None:
        _mark_shm_op_unavailable(ops)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("deepspeed.ops", _mark_shm_op_unavailable))


# m3i.train.loop imports this module before it calls init_distributed.
avoid_jit_ops()


def configure_float32_matmuls(cfg: Config, device: torch.device) -> bool:
    """Let float32 matmuls and convolutions use TF32 on CUDA as ``train.allow_tf32`` says.

    In a bf16 run the float32 work is what is left outside the weights' dtype (UniGrad's
    covariance, the InfoNCE logits, the EMA master update); in an ``fp32`` run it is everything.
    TF32 keeps float32's range with a 10-bit mantissa, the precision bf16 runs already accept.
    Process-wide and set once at start; on the CPU nothing is changed.

    Args:
        cfg: The run config (``train.allow_tf32``).
        device: The rank's device.

    Returns:
        Whether TF32 is now allowed (always ``False`` on the CPU).
    """
    if device.type != "cuda":
        return False
    # The allow_tf32 flags, not the newer fp32_precision ones: torch refuses to report the matmul
    # precision once both APIs were used in a process, and inductor and other libraries still read these.
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    return cfg.train.allow_tf32


def peak_lr(cfg: Config, world_size: int) -> float:
    """``train.lr`` scaled linearly from a global batch of 256 to the real one."""
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * world_size
    return cfg.train.lr * global_batch / 256


def lr_lambda(cfg: Config, peak: float):
    """Multiplier of the peak rate at each optimizer step: linear warm-up, then cosine to ``min_lr``."""
    t = cfg.train
    floor = t.min_lr / peak if peak > 0 else 0.0

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (also written into checkpoints for the record)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        # Lets ZeRO-1/2 optimizer shards load into another data-parallel size (resume 2 -> 1 ranks).
        zero["elastic_checkpoint"] = True
        zero["allgather_bucket_size"] = t.allgather_bucket_size
        zero["overlap_comm"] = t.overlap_comm  # ZeRO-3 overlaps by itself (DeepSpeed's default there)
    if t.zero_stage:
        zero["contiguous_gradients"] = t.contiguous_gradients
        zero["reduce_bucket_size"] = t.reduce_bucket_size
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # A client torch AdamW: DeepSpeed's own Adam would JIT-compile fused kernels.
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's own mixed precision: low-precision weights, float32 masters in the optimizer.
        # The model is dtype-clean (m3i.models.m3i), so no torch autocast is used or configured:
        # DeepSpeed would turn an outer CUDA autocast off inside the engine anyway.
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, world_size: int):
    """(engine, optimizer, scheduler) for ``model`` under ``cfg``."""
    import deepspeed

    peak = peak_lr(cfg, world_size)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=peak, betas=tuple(cfg.train.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, peak))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world_size)
    )
    return engine, optimizer, scheduler
