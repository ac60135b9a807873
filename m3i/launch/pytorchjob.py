"""The training job as a Kubeflow Training Operator ``kubeflow.org/v1 PyTorchJob``.

For clusters without Volcano. One Master and ``nodes - 1`` Workers run the same pod as
the Volcano Job (same image, env, resources, volumes and security; see
:mod:`m3i.launch.pod`). The operator gives every pod ``MASTER_ADDR``, ``MASTER_PORT``
(the Master's ``pytorchjob-port``) and ``RANK`` (the pod's index), which the container's
torchrun command reads through Kubernetes' ``$(VAR)`` expansion, so no shell is needed.
With ``launch.kueue`` the job carries Kueue's queue label; Kueue then holds it suspended
(``runPolicy.suspend``) until it admits it, where its ``kubeflow.org/pytorchjob``
integration is enabled.
"""

from __future__ import annotations

from typing import Any, Sequence

from m3i.config.launch import LaunchConfig
from m3i.launch.k8s import create_custom_object, escape_refs, unique_job_name
from m3i.launch.pod import apply_pod_policy
from m3i.launch.torchx_app import build_appdef, train_command

__all__ = ["render_pytorchjob", "submit_pytorchjob", "torchrun_command"]

CONTAINER = "pytorch"  # the operator finds the master port and injects env only in this container
PORT_NAME = "pytorchjob-port"


def torchrun_command(cfg: LaunchConfig, args: Sequence[str], module: str = "m3i") -> list[str]:
    """``torchrun`` with static rendezvous on the Master, then ``-m module args``."""
    return [
        "torchrun",
        f"--nnodes={cfg.nodes}",
        f"--nproc_per_node={cfg.ranks_per_node}",
        "--node_rank=$(RANK)",
        "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)",
        "-m",
        module,
        *(escape_refs(a) for a in args),
    ]


def render_pytorchjob(
    cfg: LaunchConfig,
    train_args: Sequence[str],
    *,
    module: str = "m3i",
    subcommand: str | None = "train",
    job_name: str | None = None,
) -> dict[str, Any]:
    """The PyTorchJob that ``m3i launch`` would submit, as a plain dict (works offline).

    Args:
        cfg: The launch section (``scheduler: kubernetes``, ``kind: pytorchjob``).
        train_args: Arguments of ``m3i train``.
        module: Python module torchrun runs.
        subcommand: First argument of the module, or ``None``.
        job_name: Exact ``metadata.name``; by default ``cfg.name`` plus a unique suffix.

    Returns:
        A ``kubeflow.org/v1`` PyTorchJob with a Master and, for ``nodes > 1``, Workers; with
        ``cfg.kueue``, labelled ``kueue.x-k8s.io/queue-name: <cfg.queue>``.
    """
    role = build_appdef(cfg, train_args, module=module, subcommand=subcommand).roles[0]
    name = job_name or unique_job_name(cfg)
    # TORCHX_* vars only make sense under torchx's own schedulers.
    env = {k: v for k, v in role.env.items() if not k.startswith("TORCHX_")}
    ports = {PORT_NAME: cfg.rdzv_port, **{n: p for n, p in role.port_map.items() if n != "c10d"}}
    args = train_command(cfg, train_args, module=module, subcommand=subcommand)

    def replica(count: int) -> dict[str, Any]:
        template = {
            "metadata": {
                "labels": {
                    "app.kubernetes.io/name": cfg.name,
                    "app.kubernetes.io/instance": name,
                    "app.kubernetes.io/managed-by": "m3i",
                },
                "annotations": {"sidecar.istio.io/inject": "false"},
            },
            "spec": {
                "containers": [
                    {
                        "name": CONTAINER,
                        "image": role.image,
                        "command": torchrun_command(cfg, args, module),
                        "env": [{"name": k, "value": v} for k, v in env.items()],
                        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports.items()],
                    }
                ],
            },
        }
        # OnFailure restarts a failed container in place; backoffLimit bounds the restarts.
        return {"replicas": count, "restartPolicy": "OnFailure", "template": apply_pod_policy(template, cfg)}

    specs = {"Master": replica(1)}
    if cfg.nodes > 1:
        specs["Worker"] = replica(cfg.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            # Kueue's built-in kubeflow.org/pytorchjob integration queues a job by this label (launch.kueue).
            "labels": {"app.kubernetes.io/name": cfg.name, "app.kubernetes.io/part-of": "m3i", **cfg.queue_labels()},
        },
        "spec": {
            "nprocPerNode": str(cfg.ranks_per_node),
            "runPolicy": {"backoffLimit": cfg.max_retries, "cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": specs,
        },
    }


def submit_pytorchjob(job: dict[str, Any]) -> str:
    """Create a rendered PyTorchJob in the current kube context; returns ``namespace:name``.

    Needs the ``kubernetes`` client, a reachable cluster with the Training Operator, and
    rights to create ``pytorchjobs.kubeflow.org`` in the job's namespace.
    """
    return create_custom_object(job, "pytorchjobs")
