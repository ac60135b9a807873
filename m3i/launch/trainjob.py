"""The training job as a Kubeflow Trainer v2 ``trainer.kubeflow.org/v1alpha1 TrainJob``, and its runtime.

A TrainJob names a runtime (``spec.runtimeRef``) and overrides only the trainer's image,
command, env, node count, processes per node and resources. Kubeflow Trainer (v2.3) turns
the pair into a JobSet: the runtime's replicated job ``node`` (label
``trainer.kubeflow.org/trainjob-ancestor-step: trainer``), whose container ``node`` gets
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the Job completion index),
``PET_MASTER_ADDR`` (``<job>-node-0-0.<job>``) and ``PET_MASTER_PORT`` (29500) from the
torch plugin. The container's torchrun command reads them through Kubernetes' ``$(VAR)``
expansion, as the PyTorchJob's reads the operator's ``RANK`` and ``MASTER_ADDR``.

What the ``trainer`` fields cannot say goes into ``spec.runtimePatches`` under the manager
``m3i.io/launch``, limited to what the Trainer lets a patch set: pod labels and annotations,
node selector, tolerations, ServiceAccount, pod and container security contexts (``IPC_LOCK``
with an RDMA device), the termination grace period, volumes (the sized memory-backed
``/dev/shm``, writable ``/tmp`` and ``/cache``) and mounts. Two
parts of the pod policy of :mod:`m3i.launch.pod` go elsewhere:

- env, the S3 Secret's keys by reference included, is ``spec.trainer.env``: the Trainer
  refuses env in a patch of the ``node`` container;
- ``automountServiceAccountToken: false``, ``enableServiceLinks: false``, the
  PriorityClass, the metrics container ports and the JobSet's restart policy are not
  patchable, so :func:`render_training_runtime` puts them in the runtime itself.

The runtime holds only what every m3i job shares. Per-job values (resources, node
selector, tolerations, the size of ``/dev/shm``, the job's env) come from each TrainJob:
the Trainer merges them into the runtime key by key, so a runtime default (say a GPU
count or a node selector) could never be taken away from a job that does not want it.

The ``m3i-launch`` ConfigMap is read by whoever runs ``m3i launch`` (the pipeline's train
step mounts it), never by the training pods: as for the Volcano Job and the PyTorchJob,
every setting reaches the pods as ``m3i train`` arguments.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from m3i.config.launch import TRAINER_MASTER_PORT, LaunchConfig
from m3i.launch.pod import POD_LABELS, SHM_VOLUME, apply_pod_policy, resources
from m3i.launch.k8s import create_custom_object, escape_refs, unique_job_name
from m3i.launch.torchx_app import train_command, train_env

__all__ = [
    "render_trainjob",
    "render_training_runtime",
    "submit_trainjob",
    "torchrun_command",
    "API_VERSION",
    "NODE",
    "PATCH_MANAGER",
    "RUNTIME_RANKS",
]

API_VERSION = "trainer.kubeflow.org/v1alpha1"
GROUP, VERSION = API_VERSION.split("/")

NODE = "node"
"""Name of the torch runtime's replicated job and of its trainer container (Trainer's ``constants.Node``):
the torch plugin injects the ``PET_*`` env only into this container."""

ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
"""Marks the replicated job that ``spec.trainer`` of a TrainJob overrides (value ``trainer``)."""

PATCH_MANAGER = "m3i.io/launch"
"""Owner of m3i's entry in ``spec.runtimePatches`` (the Trainer wants a domain-prefixed path)."""

RUNTIME_RANKS = 8
"""Local ranks whose metrics ports the runtime declares (the PodMonitors scrape ``metrics`` ... ``metrics-7``)."""

# Pod spec fields of the pod policy a runtime patch may set (TrainJob v2.3 PodSpecPatch).
_PATCHED_POD_FIELDS = ("serviceAccountName", "securityContext", "nodeSelector", "tolerations", "volumes", "terminationGracePeriodSeconds")

_RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

# Env every m3i pod needs whatever the job: unbuffered logs, caches on the writable emptyDirs.
_RUNTIME_ENV = ("PYTHONUNBUFFERED", "HOME", "TMPDIR", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR")


def torchrun_command(args: Sequence[str], module: str = "m3i") -> list[str]:
    """``torchrun`` with static rendezvous on node 0 from the Trainer's ``PET_*`` env, then ``-m module args``."""
    return [
        "torchrun",
        "--nnodes=$(PET_NNODES)",
        "--nproc_per_node=$(PET_NPROC_PER_NODE)",
        "--node_rank=$(PET_NODE_RANK)",
        "--master_addr=$(PET_MASTER_ADDR)",
        "--master_port=$(PET_MASTER_PORT)",
        "-m",
        module,
        *(escape_refs(a) for a in args),
    ]


def _check_job_name(name: str) -> None:
    # The TrainJob CRD's own rule (CEL, which offline schema checks skip).
    if not (len(name) <= 63 and _RFC1035.fullmatch(name)):
        raise ValueError(f"TrainJob name {name!r} must be an RFC 1035 label: at most 63 of a-z, 0-9, '-', starting with a letter")


def render_trainjob(
    cfg: LaunchConfig,
    train_args: Sequence[str],
    *,
    module: str = "m3i",
    subcommand: str | None = "train",
    job_name: str | None = None,
) -> dict[str, Any]:
    """The TrainJob that ``m3i launch`` would submit, as a plain dict (works offline).

    Args:
        cfg: The launch section (``scheduler: kubernetes``, ``kind: trainjob``).
        train_args: Arguments of ``m3i train``.
        module: Python module torchrun runs.
        subcommand: First argument of the module, or ``None``.
        job_name: Exact ``metadata.name``; by default ``cfg.name`` plus a unique suffix.

    Returns:
        A ``trainer.kubeflow.org/v1alpha1`` TrainJob on ``cfg.runtime`` with ``cfg.nodes`` nodes
        of ``cfg.ranks_per_node`` processes, and m3i's pod policy as its runtime patch.

    Raises:
        ValueError: ``job_name`` is not an RFC 1035 label.
    """
    name = job_name or unique_job_name(cfg)
    _check_job_name(name)
    args = train_command(cfg, train_args, module=module, subcommand=subcommand)
    # TORCHX_* vars only make sense under torchx's own schedulers.
    env = [{"name": k, "value": v} for k, v in train_env(cfg).items() if not k.startswith("TORCHX_")]

    # The pod policy every kind shares, rendered on a bare pod; the patchable part goes into the patch.
    pod = apply_pod_policy({"spec": {"containers": [{"name": NODE}]}}, cfg)
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    pod_patch = {k: spec[k] for k in _PATCHED_POD_FIELDS if k in spec}
    pod_patch["containers"] = [
        {"name": NODE, "securityContext": container["securityContext"], "volumeMounts": container["volumeMounts"]}
    ]
    labels = {
        "app.kubernetes.io/name": cfg.name,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "m3i",
        **pod["metadata"]["labels"],
    }
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "spec": {
                                    "template": {
                                        "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/inject": "false"}},
                                        "spec": pod_patch,
                                    }
                                }
                            },
                        }
                    ]
                }
            }
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            "labels": {"app.kubernetes.io/name": cfg.name, "app.kubernetes.io/part-of": "m3i", **cfg.queue_labels()},
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": cfg.runtime_kind, "name": cfg.runtime},
            "trainer": {
                "image": cfg.image,
                "command": torchrun_command(args, module),
                # The S3 Secret's keys by reference: the Trainer takes env of the node container only here.
                "env": [*env, *container["env"]],
                "numNodes": cfg.nodes,
                "numProcPerNode": cfg.ranks_per_node,
                "resourcesPerNode": resources(cfg),
            },
            "runtimePatches": [patch],
        },
    }


def _runtime_ports(cfg: LaunchConfig) -> list[dict[str, Any]]:
    """Metrics ports of ``max(RUNTIME_RANKS, ranks_per_node)`` local ranks, named as torchx_app.metrics_ports names them.

    A patch cannot add container ports, so the runtime declares them for every job it runs.
    """
    ranks = max(RUNTIME_RANKS, cfg.ranks_per_node)
    first, last = cfg.metrics_port, cfg.metrics_port + ranks - 1
    if last > 65535 or first <= TRAINER_MASTER_PORT <= last:
        raise ValueError(
            f"launch.metrics_port={cfg.metrics_port}: the runtime's {ranks} metrics ports {first}..{last} must stay "
            f"at or below 65535 and clear of the Trainer's port {TRAINER_MASTER_PORT}"
        )
    names = ["metrics" if r == 0 else f"metrics-{r}" for r in range(ranks)]
    return [{"name": n, "containerPort": first + r, "protocol": "TCP"} for r, n in enumerate(names)]


def render_training_runtime(cfg: LaunchConfig, cluster: bool | None = None) -> dict[str, Any]:
    """The m3i runtime TrainJobs reference: ``m3i train`` under torchrun in the m3i image.

    Kubeflow's ``torch-distributed`` runtime shape (``mlPolicy.torch``, replicated job and
    container ``node``) with the restricted pod of :mod:`m3i.launch.pod`, plus what a
    TrainJob cannot patch: ``automountServiceAccountToken: false``, ``enableServiceLinks:
    false`` (a Service named like a torchrun variable would shadow it), the PriorityClass,
    the metrics ports and whole-job restarts (a failed or evicted pod fails its Job,
    ``backoffLimit: 0``, and the JobSet restarts every node up to ``max_retries`` times, as
    the Volcano Job does). The runtime's command runs ``m3i train`` with its defaults.

    Args:
        cfg: The launch section: ``runtime`` (name), ``namespace``, ``image``, ``metrics_port``,
            ``run_as_user``, ``read_only_root_filesystem``, ``priority_class``, ``service_account``
            and ``max_retries`` shape it; sizes, placement and env are left to each TrainJob.
        cluster: Render a ClusterTrainingRuntime (no namespace, no ServiceAccount, which would
            have to exist in every namespace) instead of a TrainingRuntime; ``None`` follows
            ``cfg.runtime_kind``.

    Returns:
        A ``trainer.kubeflow.org/v1alpha1`` TrainingRuntime or ClusterTrainingRuntime.

    Raises:
        ValueError: The runtime's metrics ports pass 65535 or cover the Trainer's port 29500.
    """
    if cluster is None:
        cluster = cfg.runtime_kind == "ClusterTrainingRuntime"
    # An RDMA device and its IPC_LOCK capability are a job's to ask for, never every job's.
    cfg = dataclasses.replace(cfg, rdma_resource=None)
    env = train_env(cfg)
    pod = apply_pod_policy(
        {
            "metadata": {"labels": dict(POD_LABELS)},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": NODE,
                        "image": cfg.image,
                        # Images are pinned by tag or digest (launch.image), so a cached one is the same.
                        "imagePullPolicy": "IfNotPresent",
                        # The device follows each job's GPUs (the TrainJob's command); the runtime's own is auto.
                        "command": torchrun_command(train_command(cfg, [], device=False)),
                        "env": [{"name": k, "value": env[k]} for k in _RUNTIME_ENV],
                        "ports": _runtime_ports(cfg),
                    }
                ],
            },
        },
        cfg,
    )
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    # Per-job parts of the pod policy: each TrainJob sets its own (trainer, runtime patch).
    for key in ("nodeSelector", "tolerations", *(("serviceAccountName",) if cluster else ())):
        spec.pop(key, None)
    del container["resources"]
    container["env"] = [e for e in container["env"] if "valueFrom" not in e]
    for volume in spec["volumes"]:
        if volume["name"] == SHM_VOLUME:
            del volume["emptyDir"]["sizeLimit"]  # bounded by the memory limit until the job's patch sizes it
    metadata: dict[str, Any] = {"name": cfg.runtime}
    if not cluster:
        metadata["namespace"] = cfg.namespace
    metadata["labels"] = {
        "trainer.kubeflow.org/framework": "torch",
        "app.kubernetes.io/name": cfg.runtime,
        **POD_LABELS,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterTrainingRuntime" if cluster else "TrainingRuntime",
        "metadata": metadata,
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": {"maxRestarts": cfg.max_retries},
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                                "spec": {"backoffLimit": 0, "template": pod},
                            },
                        }
                    ],
                }
            },
        },
    }


def submit_trainjob(job: dict[str, Any]) -> str:
    """Create a rendered TrainJob in the current kube context; returns ``namespace:name``.

    Needs the ``kubernetes`` client, a reachable cluster with Kubeflow Trainer v2 and the
    runtime the job references, and rights to create ``trainjobs.trainer.kubeflow.org`` in
    the job's namespace.
    """
    return create_custom_object(job, "trainjobs")
