"""The torchx ``AppDef`` of a training job: ``torchrun -m m3i train ...`` via ``dist.ddp``.

One role, ``nodes`` replicas, ``ranks_per_node`` processes each (one per GPU unless
``nproc_per_node`` says otherwise). What torchx 0.7 cannot
express (tolerations, arbitrary node selectors, Secret references, security contexts,
the size of ``/dev/shm``) is added to the rendered Kubernetes object in
:mod:`m3i.launch.pod`, not here.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from torchx import specs
from torchx.components.dist import ddp

from m3i.config.launch import LaunchConfig, quantity_bytes

__all__ = ["build_appdef", "metrics_ports", "train_command", "train_env", "CACHE_DIR", "TERMINATION_GRACE_ENV", "TMP_DIR"]

CACHE_DIR = "/cache"
"""Writable emptyDir in the pod for compiled extensions and library caches."""

TMP_DIR = "/tmp"
"""Writable emptyDir in the pod for temporary files (torchrun's log folders among them)."""

TERMINATION_GRACE_ENV = "M3I_TERMINATION_GRACE_SECONDS"
"""Env var of the ranks holding ``launch.termination_grace_seconds``: the time a SIGTERM save has."""


def train_env(cfg: LaunchConfig) -> dict[str, str]:
    """Plain environment of the trainer processes (no secrets: those are references, added per target).

    Args:
        cfg: The launch section.

    Returns:
        Env var names to values; ``launch.env`` entries win over the defaults.
    """
    env = {
        "PYTHONUNBUFFERED": "1",
        # torchrun would force 1 thread per process; give each process its share of the pod's cores.
        "OMP_NUM_THREADS": str(max(1, int(cfg.cpu // cfg.ranks_per_node))),
        # What a SIGTERM save may take before Kubernetes kills the pod (terminationGracePeriodSeconds).
        TERMINATION_GRACE_ENV: str(cfg.termination_grace_seconds),
    }
    if cfg.gpus_per_node:
        env["NCCL_DEBUG"] = "WARN"
    else:
        # DeepSpeed picks gloo on CPU only when told; without it, it probes for CUDA and fails.
        env["DS_ACCELERATOR"] = "cpu"
        # No GPU asked for: the ranks must not see one, even on a GPU node (where NCCL would be
        # picked with the model on the CPU). The empty CUDA_VISIBLE_DEVICES hides the devices from
        # CUDA; on Kubernetes NVIDIA_VISIBLE_DEVICES=void also keeps the NVIDIA container runtime
        # from mounting them into a pod that requested none (CUDA images set it to "all").
        env["CUDA_VISIBLE_DEVICES"] = ""
        if cfg.scheduler == "kubernetes":
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
    env.update(cfg.nccl_env)
    if cfg.scheduler == "kubernetes":
        # The root filesystem is read-only: point every cache at the writable emptyDirs.
        env.update(
            {
                "HOME": TMP_DIR,
                "TMPDIR": TMP_DIR,
                "XDG_CACHE_HOME": CACHE_DIR,
                "TORCH_EXTENSIONS_DIR": f"{CACHE_DIR}/torch_extensions",
                "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
            }
        )
    else:
        # torchx's local_cwd runs `bash -c "torchrun ..."`: find this interpreter's torchrun first,
        # even when the virtualenv is not activated (local_cwd prepends this PATH to the parent's).
        env["PATH"] = os.path.dirname(sys.executable)
    env.update(cfg.env_dict())
    return env


def train_command(
    cfg: LaunchConfig,
    train_args: Sequence[str],
    *,
    module: str = "m3i",
    subcommand: str | None = "train",
    device: bool = True,
) -> list[str]:
    """What follows ``python -m {module}``: the subcommand, ``train_args`` and, for ``m3i train``, last
    so that they win: ``--set train.device=cuda`` with GPUs (``cpu`` without; unless ``device`` is
    false) and ``--set metrics.port={cfg.metrics_port}``.

    The device follows what the pod gets, so a rank that asked for GPUs and cannot use them stops at
    start with the reason instead of training on the CPU."""
    args = [*([subcommand] if subcommand else []), *train_args]
    if (module, subcommand) == ("m3i", "train"):
        if device:
            args += ["--set", f"train.device={'cuda' if cfg.gpus_per_node else 'cpu'}"]
        args += ["--set", f"metrics.port={cfg.metrics_port}"]
    return args


def metrics_ports(cfg: LaunchConfig) -> dict[str, int]:
    """Container ports of the trainer's Prometheus endpoints, one per local rank.

    ``m3i train`` serves rank ``r`` of a pod on ``metrics.port + r``. Local rank 0 is port
    ``metrics``, the others ``metrics-1``, ``metrics-2``, ...: a PodMonitor scrapes rank 0 by
    ``port: metrics``, or every rank by keeping port names matching ``metrics(-[0-9]+)?``.
    """
    return {("metrics" if r == 0 else f"metrics-{r}"): cfg.metrics_port + r for r in range(cfg.ranks_per_node)}


def build_appdef(
    cfg: LaunchConfig,
    train_args: Sequence[str],
    *,
    module: str = "m3i",
    subcommand: str | None = "train",
) -> specs.AppDef:
    """The torchx app that runs ``python -m {module} {subcommand} {train_args}`` under torchrun.

    Args:
        cfg: The launch section.
        train_args: Arguments after the subcommand, passed through verbatim.
        module: Python module torchrun runs (tests point it at a probe module).
        subcommand: First argument of the module; ``None`` passes ``train_args`` alone.

    Returns:
        A ``dist.ddp`` AppDef: one role with ``cfg.nodes`` replicas of ``cfg.ranks_per_node``
        processes, the pod resources, the env of :func:`train_env` and the ports of
        :func:`metrics_ports`. For ``m3i train`` a last ``--set metrics.port=...`` keeps the
        served ports equal to the exposed ones.
    """
    args = train_command(cfg, train_args, module=module, subcommand=subcommand)
    app = ddp(
        *args,
        m=module,
        image=cfg.image,
        name=cfg.name,
        cpu=cfg.cpu,  # type: ignore[arg-type]  # torchx annotates int; Kubernetes takes fractions
        gpu=cfg.gpus_per_node,
        memMB=quantity_bytes(cfg.memory) // 2**20,
        j=f"{cfg.nodes}x{cfg.ranks_per_node}",
        env=train_env(cfg),
        max_retries=cfg.max_retries,
        rdzv_port=cfg.rdzv_port,
    )
    role = app.roles[0]
    role.port_map.update(metrics_ports(cfg))
    # torchx's kubernetes scheduler only reads node.kubernetes.io/instance-type from here; the
    # full selector is set on the rendered pods. Kept on the AppDef so it describes the whole job.
    role.resource.capabilities.update(cfg.node_selector)
    return app
