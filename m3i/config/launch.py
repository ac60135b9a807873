"""Config section ``launch``: where and how ``m3i launch`` runs ``m3i train``.

The same section drives four targets: torchx's ``local_cwd`` scheduler (processes on
this machine), a Volcano ``Job`` through torchx's ``kubernetes`` scheduler, a Kubeflow
Training Operator v1 ``PyTorchJob`` and a Kubeflow Trainer v2 ``TrainJob`` (which runs on
the m3i ``TrainingRuntime`` that manifests/ and the Helm chart install). With ``kueue``
on, the TrainJob, PyTorchJob or Volcano Job carries Kueue's queue label. Only names of Kubernetes
objects (a Secret, a queue, a runtime, a service account) ever appear here, never a
credential.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from m3i.config.core import check_choice, check_range
from m3i.config.credentials import CREDENTIAL_ENV_NAME, is_credential_name, is_credential_value

__all__ = [
    "LaunchConfig",
    "parse_toleration",
    "quantity_bytes",
    "CREDENTIAL_ENV_NAME",
    "KUEUE_QUEUE_LABEL",
    "S3_SECRET_KEYS",
    "TORCHRUN_ENV",
    "TRAINER_MASTER_PORT",
]

SCHEDULERS = ("local_cwd", "kubernetes")
KINDS = ("volcano", "pytorchjob", "trainjob")
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""The label by which Kueue finds a job's LocalQueue (``launch.kueue``)."""

TRAINER_MASTER_PORT = 29500
"""The rendezvous port Kubeflow Trainer's torch plugin gives every TrainJob (``PET_MASTER_PORT``);
not configurable there, so ``launch.rdzv_port`` must equal it with ``kind: trainjob``."""

TORCHRUN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
"""torchrun's settings as env vars, which Kubeflow Trainer injects into a TrainJob's trainer
container and refuses in ``spec.trainer.env``."""

S3_SECRET_KEYS: dict[str, bool] = {
    "AWS_ACCESS_KEY_ID": False,
    "AWS_SECRET_ACCESS_KEY": False,
    "AWS_ENDPOINT_URL": False,
    "AWS_REGION": True,
}
"""Keys read from ``launch.s3_secret`` into same-named env vars; True marks a key the Secret may omit."""

_MAX_POD_BYTES = 2**50

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NCCL_ENV = re.compile(r"^(TORCH_)?NCCL_[A-Z0-9_]+$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})
# registry[:port]/path[:tag][@sha256:digest], lower-case path as the distribution spec asks.
_IMAGE = re.compile(
    r"^(?P<repo>[a-zA-Z0-9.-]+(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+|[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


def quantity_bytes(text: str) -> int:
    """Bytes of a Kubernetes memory quantity such as ``32Gi``, ``500M`` or ``1024``.

    Raises:
        ValueError: When ``text`` is not a quantity.
    """
    m = _QUANTITY.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity such as 32Gi or 500M")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


def parse_toleration(text: str) -> dict[str, str]:
    """A pod toleration from ``key[=value][:Effect]``.

    ``nvidia.com/gpu:NoSchedule`` tolerates that taint whatever its value (``Exists``);
    ``pool=gpu:NoSchedule`` only the value ``gpu`` (``Equal``); without an effect every
    effect of the taint is tolerated.

    Raises:
        ValueError: Naming the entry and the allowed form.
    """
    spec, sep, effect = str(text).partition(":")
    key, has_value, value = spec.partition("=")
    form = "use key[=value][:Effect], e.g. nvidia.com/gpu:NoSchedule"
    if not _is_label_key(key) or (has_value and not _is_label_value(value)):
        raise ValueError(f"launch.tolerations entry {text!r} is malformed; {form}")
    if sep and effect not in TAINT_EFFECTS:
        raise ValueError(f"launch.tolerations entry {text!r} has effect {effect!r}; choose one of {list(TAINT_EFFECTS)}")
    tol = {"key": key, "operator": "Equal" if has_value else "Exists"}
    if has_value:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def _mapping_of_str(name: str, value: Any) -> dict[str, str]:
    """Normalise ``{k: v}`` or ``"k=v,k2=v2"`` (what ``--set`` can carry) to a plain dict of str."""
    if isinstance(value, str):
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ValueError(f"launch.{name}={value!r} must be a mapping or 'key=value,key2=value2'")
        value = dict(p.split("=", 1) for p in pairs)
    if not isinstance(value, Mapping):
        raise ValueError(f"launch.{name}={value!r} must be a mapping of label keys to values")
    out = {}
    for k, v in value.items():
        if isinstance(v, (dict, list, tuple)) or v is None:
            raise ValueError(f"launch.{name}[{k!r}]={v!r} must be a string")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _check_name(name: str, value: str | None, *, subdomain: bool = False, max_len: int = 63) -> None:
    if value is None:
        return
    pattern = _DNS_SUBDOMAIN if subdomain else _DNS_LABEL
    if not (0 < len(value) <= max_len and pattern.match(value)):
        kind = "DNS-1123 subdomain" if subdomain else "DNS-1123 label"
        raise ValueError(
            f"launch.{name}={value!r} is not a Kubernetes name; use a {kind} (a-z, 0-9, '-') of at most {max_len} characters"
        )


@dataclass(frozen=True)
class LaunchConfig:
    """How ``m3i launch`` places ``m3i train``: scheduler, image, size and the pod's policy."""

    scheduler: str = "local_cwd"
    """torchx scheduler: ``local_cwd`` (processes on this machine, in the current folder) or ``kubernetes``."""

    kind: str = "volcano"
    """On ``kubernetes``: ``volcano`` (a Volcano Job through torchx, gang-scheduled on Volcano clusters),
    ``pytorchjob`` (a Kubeflow Training Operator v1 PyTorchJob, for legacy v1 clusters) or ``trainjob``
    (a Kubeflow Trainer v2 TrainJob on the runtime named by ``runtime``)."""

    runtime: str = "m3i-torch"
    """``kind: trainjob``: name of the Kubeflow Trainer runtime the TrainJob references (``spec.runtimeRef``);
    manifests/components/trainer-runtime and the Helm chart (``trainer.runtime.enabled``) install ``m3i-torch``."""

    runtime_kind: str = "TrainingRuntime"
    """``kind: trainjob``: ``TrainingRuntime`` (namespaced: it must live in ``namespace``) or
    ``ClusterTrainingRuntime`` (cluster-scoped, shared by every namespace)."""

    name: str = "m3i-train"
    """Job name prefix; a unique suffix is added per launch. A DNS-1123 label of at most 30 characters."""

    image: str = "ghcr.io/m3i-project/m3i-train:0.1.0"
    """Container image with m3i installed, pinned by tag or digest (``latest`` is refused)."""

    nodes: int = 1
    """Pods (hosts) in the job; each runs one torchrun agent."""

    nproc_per_node: int = 0
    """Training processes (ranks) per pod; 0 (the default) runs one per GPU (``gpus_per_node``), or one
    without GPUs. A value other than 0 is taken as given (at most ``gpus_per_node`` with GPUs);
    :attr:`ranks_per_node` is what runs."""

    cpu: float = 4.0
    """CPU cores requested (and limited to) per pod."""

    memory: str = "16Gi"
    """Memory requested (and limited to) per pod, as a Kubernetes quantity; includes ``shm_size``."""

    gpus_per_node: int = 0
    """``nvidia.com/gpu`` per pod (and, with ``nproc_per_node`` 0, one rank per GPU); every rank gets
    ``--set train.device=cuda`` and fails at start when CUDA is unusable. 0 trains on CPU with gloo:
    the ranks get ``train.device=cpu``, ``DS_ACCELERATOR=cpu`` and ``CUDA_VISIBLE_DEVICES=""`` (and
    ``NVIDIA_VISIBLE_DEVICES=void`` on Kubernetes), so they see no GPU even on a GPU node."""

    node_selector: dict[str, str] = field(default_factory=dict, hash=False)
    """Node labels a pod must match, e.g. ``{cloud.google.com/gke-accelerator: nvidia-h100-80gb}``
    (also accepted as ``key=value,key2=value2``)."""

    tolerations: tuple[str, ...] = ()
    """Taints the pods tolerate, each ``key[=value][:Effect]``, e.g. ``nvidia.com/gpu:NoSchedule``."""

    shm_size: str = "4Gi"
    """Size of the memory-backed ``/dev/shm`` (DataLoader workers and NCCL use it); counts against ``memory``."""

    s3_secret: str | None = "m3i-s3"
    """Kubernetes Secret whose keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (and
    optionally AWS_REGION) become env vars by reference; ``null`` injects none. ``local_cwd``
    inherits this shell's environment instead."""

    namespace: str = "default"
    """Kubernetes namespace of the job."""

    queue: str = "default"
    """Volcano queue (``kind: volcano``); with ``kueue`` also the Kueue LocalQueue in ``namespace``."""

    kueue: bool = False
    """Label the TrainJob, PyTorchJob or Volcano Job with ``kueue.x-k8s.io/queue-name: <queue>``, so
    that Kueue queues it and admits it against quota (Kueue integrates TrainJobs, and PyTorchJobs when
    its ``kubeflow.org/pytorchjob`` integration is on; it has no Volcano integration)."""

    priority_class: str | None = None
    """PriorityClass of the pods, or ``null`` for the cluster default. ``kind: trainjob``: a TrainJob
    cannot set it; the runtime does (:func:`m3i.launch.trainjob.render_training_runtime`)."""

    service_account: str | None = None
    """ServiceAccount of the pods (e.g. one bound to a cloud IAM role), or ``null`` for the namespace default."""

    max_retries: int = 3
    """Restarts of the whole job after a pod fails or is evicted (preemption) before it is marked failed.
    ``kind: trainjob``: the runtime's JobSet ``failurePolicy.maxRestarts``, which a TrainJob cannot set."""

    rdzv_port: int = 29500
    """Port of the rendezvous / c10d store on the first pod (``kind: trainjob``: Kubeflow Trainer fixes it at 29500)."""

    metrics_port: int = 9400
    """Base port of the trainer's Prometheus endpoints (local rank ``r`` serves on ``metrics_port + r``),
    exposed as container ports ``metrics``, ``metrics-1``, ...; passed to ``m3i train`` as
    ``--set metrics.port=...``."""

    termination_grace_seconds: int = 300
    """Seconds Kubernetes waits after SIGTERM (preemption, eviction, node drain, deletion) before it kills a
    training pod (``terminationGracePeriodSeconds`` of every pod kind; the ranks read it as
    ``M3I_TERMINATION_GRACE_SECONDS``). On SIGTERM ``m3i train`` finishes its step and saves a final
    checkpoint, which must fit in this time. Rough numbers for ViT-B/16 under M3I (online and EMA encoders
    plus heads, ~0.2 G parameters): the ZeRO files hold fp32 weights and two Adam moments, ~12 bytes a
    parameter, ~2.4 GB, and the world-size-free full copy as much again; ~5 GB staged, hashed (~1 GB/s)
    and uploaded at 50-100 MB/s to object storage is 1-2 minutes, plus a step and the collective gather.
    Kubernetes' default of 30 s would kill that save midway; 300 s leaves room. Raise it for larger models
    or slower storage; a spot VM's own notice (30 s to 2 min) is not extended by it."""

    nccl_env: dict[str, str] = field(default_factory=dict, hash=False)
    """NCCL settings of the ranks as env vars, e.g. ``{NCCL_SOCKET_IFNAME: eth0, NCCL_IB_HCA: mlx5}``
    (also accepted as ``NAME=value,NAME2=value2``): only ``NCCL_*`` and ``TORCH_NCCL_*`` names, whose values
    are network and tuning settings, never credentials. They win over m3i's ``NCCL_DEBUG=WARN``;
    ``env`` wins over them."""

    rdma_resource: str | None = None
    """Extended resource of an RDMA / InfiniBand device plugin each pod requests, e.g. ``rdma/ib``,
    ``rdma/hca_shared_devices_a`` or ``nvidia.com/hostdev``; ``null`` (the default) requests none. With it
    the container adds the capability ``IPC_LOCK`` (NCCL pins its RDMA buffers), which Pod Security
    ``restricted`` and ``baseline`` refuse: the training namespace must enforce ``privileged``."""

    rdma_per_node: int = 1
    """How many ``rdma_resource`` devices each pod requests."""

    env: tuple[str, ...] = ()
    """Extra ``KEY=VALUE`` env vars of the trainer (e.g. ``NCCL_SOCKET_IFNAME=eth0``); never credentials:
    names that look like one (:mod:`m3i.config.credentials`: ``*SECRET*``, ``*PASSWORD*``, ``*CREDENTIAL*``,
    ``HF_TOKEN``, ``WANDB_API_KEY``, ``GITHUB_PAT``, ``BASIC_AUTH``, ``MINIO_ROOT_*``, ...) and values shaped like
    one (``AKIA...``, ``ghp_...``, a URL with a password) are refused, as the Helm chart refuses them."""

    run_as_user: int = 1000
    """Non-root UID (and GID) the container runs as."""

    read_only_root_filesystem: bool = True
    """Mount the image read-only; ``/tmp`` and ``/cache`` are writable emptyDirs."""

    def __post_init__(self) -> None:
        s = "launch"
        check_choice(s, "scheduler", self.scheduler, SCHEDULERS)
        check_choice(s, "kind", self.kind, KINDS)
        _check_name("name", self.name, max_len=30)
        _check_name("runtime", self.runtime, subdomain=True, max_len=253)
        check_choice(s, "runtime_kind", self.runtime_kind, RUNTIME_KINDS)
        m = _IMAGE.match(self.image)
        if not m or not (m.group("tag") or m.group("digest")):
            raise ValueError(f"launch.image={self.image!r} must be a pinned image reference, repo:tag or repo@sha256:digest")
        if m.group("tag") == "latest" and not m.group("digest"):
            raise ValueError(f"launch.image={self.image!r} uses the moving tag 'latest'; pin a version tag or a digest")
        check_range(s, "nodes", self.nodes, 1, 1024)
        check_range(s, "nproc_per_node", self.nproc_per_node, 0, 128)
        check_range(s, "cpu", self.cpu, 0, 4096, lo_open=True)
        check_range(s, "gpus_per_node", self.gpus_per_node, 0, 64)
        if self.gpus_per_node and self.nproc_per_node > self.gpus_per_node:
            raise ValueError(
                f"launch.nproc_per_node={self.nproc_per_node} exceeds launch.gpus_per_node={self.gpus_per_node}; "
                "run at most one process per GPU"
            )
        for name in ("memory", "shm_size"):
            try:
                size = quantity_bytes(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"launch.{name}: {e}") from None
            if size > _MAX_POD_BYTES:
                raise ValueError(
                    f"launch.{name}={getattr(self, name)!r} is above 1Pi, more than any node has; give a quantity such as 32Gi"
                )
        if quantity_bytes(self.shm_size) >= quantity_bytes(self.memory):
            raise ValueError(
                f"launch.shm_size={self.shm_size!r} must be below launch.memory={self.memory!r}; /dev/shm counts against it"
            )
        selector = _mapping_of_str("node_selector", self.node_selector)
        for k, v in selector.items():
            if not _is_label_key(k) or not _is_label_value(v):
                raise ValueError(f"launch.node_selector has {k!r}: {v!r}, which is not a valid label key and value")
        object.__setattr__(self, "node_selector", selector)
        for tol in self.tolerations:
            parse_toleration(tol)
        _check_name("s3_secret", self.s3_secret, subdomain=True, max_len=253)
        _check_name("namespace", self.namespace)
        _check_name("queue", self.queue, subdomain=True, max_len=253)
        _check_name("priority_class", self.priority_class, subdomain=True, max_len=253)
        _check_name("service_account", self.service_account, subdomain=True, max_len=253)
        check_range(s, "max_retries", self.max_retries, 0, 100)
        check_range(s, "rdzv_port", self.rdzv_port, 1024, 65535)
        check_range(s, "metrics_port", self.metrics_port, 1024, 65535)
        last = self.metrics_port + self.ranks_per_node - 1
        if last > 65535:
            raise ValueError(f"launch.metrics_port={self.metrics_port} + {self.ranks_per_node} local ranks passes port 65535")
        if self.metrics_port <= self.rdzv_port <= last:
            raise ValueError(
                f"launch.rdzv_port={self.rdzv_port} falls in the metrics ports {self.metrics_port}..{last} "
                "(launch.metrics_port + local rank); move one of them"
            )
        for item in self.env:
            key, sep, value = item.partition("=")
            if not sep or not _ENV_NAME.match(key):
                raise ValueError(f"launch.env entry {item!r} must look like KEY=VALUE")
            if is_credential_name(key):
                raise ValueError(
                    f"launch.env sets {key}; credentials come only from the Secret named by launch.s3_secret "
                    "(launch.env refuses names like *SECRET*, *PASSWORD*, *CREDENTIAL*, *_TOKEN, *_KEY, *_PAT, *_AUTH, "
                    "MINIO_ROOT_*: m3i.config.credentials)"
                )
            if is_credential_value(value):
                # The value is not shown: it is the secret.
                raise ValueError(
                    f"launch.env sets {key} to a value shaped like a credential (an access key, a token, a private key "
                    "or a URL with a password); credentials come only from the Secret named by launch.s3_secret"
                )
        check_range(s, "run_as_user", self.run_as_user, 1, 2**31 - 1)
        check_range(s, "termination_grace_seconds", self.termination_grace_seconds, 1, 86400)
        nccl = _mapping_of_str("nccl_env", self.nccl_env)
        for k in nccl:
            if not _NCCL_ENV.match(k):
                raise ValueError(
                    f"launch.nccl_env sets {k!r}; only NCCL_* and TORCH_NCCL_* names are allowed (other env goes in launch.env)"
                )
        object.__setattr__(self, "nccl_env", nccl)
        if self.rdma_resource is not None and not (_is_label_key(self.rdma_resource) and "/" in self.rdma_resource):
            raise ValueError(
                f"launch.rdma_resource={self.rdma_resource!r} is not an extended resource name; use domain/name, e.g. rdma/ib"
            )
        check_range(s, "rdma_per_node", self.rdma_per_node, 1, 64)
        if self.kind == "trainjob":
            self._check_trainjob()
        if self.kueue and not _is_label_value(self.queue):
            raise ValueError(f"launch.queue={self.queue!r} must be a label value (at most 63 characters) with launch.kueue=true")

    def _check_trainjob(self) -> None:
        """What Kubeflow Trainer v2 requires of a TrainJob beyond the checks of every kind."""
        if not self.name[0].isalpha():
            raise ValueError(
                f"launch.name={self.name!r} must start with a letter with launch.kind='trainjob' "
                "(a TrainJob's name is an RFC 1035 label)"
            )
        if self.rdzv_port != TRAINER_MASTER_PORT:
            raise ValueError(
                f"launch.rdzv_port={self.rdzv_port} cannot apply with launch.kind='trainjob': Kubeflow Trainer always "
                f"gives torchrun port {TRAINER_MASTER_PORT} (PET_MASTER_PORT); leave launch.rdzv_port={TRAINER_MASTER_PORT}"
            )
        reserved = sorted(set(self.env_dict()) & set(TORCHRUN_ENV))
        if reserved:
            raise ValueError(f"launch.env sets {reserved}, which Kubeflow Trainer injects itself with launch.kind='trainjob'")

    @property
    def ranks_per_node(self) -> int:
        """Training processes per pod: ``nproc_per_node``, or with 0 one per GPU (one without GPUs)."""
        return self.nproc_per_node or self.gpus_per_node or 1

    def env_dict(self) -> dict[str, str]:
        """``launch.env`` as a dict (later entries win)."""
        return dict(item.split("=", 1) for item in self.env)

    def queue_labels(self) -> dict[str, str]:
        """The job's Kueue label ``{kueue.x-k8s.io/queue-name: queue}`` with ``kueue`` on, else none."""
        return {KUEUE_QUEUE_LABEL: self.queue} if self.kueue else {}
