"""The pod policy shared by every Kubernetes target: placement, resources, volumes, security.

torchx 0.7's kubernetes scheduler renders a pod per task but cannot express tolerations,
node selectors other than ``node.kubernetes.io/instance-type``, env from Secrets, a sized
``/dev/shm``, security contexts, an RDMA device or the termination grace period. :func:`apply_pod_policy` sets all of them on a rendered
pod template (a plain dict), so the Volcano Job and the PyTorchJob carry the same pod.
"""

from __future__ import annotations

from typing import Any

from m3i.config.launch import S3_SECRET_KEYS, LaunchConfig, parse_toleration
from m3i.launch.torchx_app import CACHE_DIR, TMP_DIR

__all__ = ["apply_pod_policy", "capabilities", "resources", "secret_env", "POD_LABELS"]

POD_LABELS = {"app.kubernetes.io/part-of": "m3i", "app.kubernetes.io/component": "train"}
"""Labels on every training pod: what a PodMonitor selects (with port ``metrics``)."""

SHM_VOLUME = "dshm"  # the name torchx gives its /dev/shm volume; reused so there is one


def resources(cfg: LaunchConfig) -> dict[str, dict[str, str]]:
    """Requests equal to limits (Guaranteed QoS: the last pods evicted under node pressure)."""
    cpu = f"{cfg.cpu:g}" if float(cfg.cpu).is_integer() else f"{round(cfg.cpu * 1000)}m"
    amount = {"cpu": cpu, "memory": cfg.memory}
    if cfg.gpus_per_node:
        amount["nvidia.com/gpu"] = str(cfg.gpus_per_node)
    if cfg.rdma_resource:
        amount[cfg.rdma_resource] = str(cfg.rdma_per_node)
    return {"requests": dict(amount), "limits": dict(amount)}


def secret_env(cfg: LaunchConfig) -> list[dict[str, Any]]:
    """Env vars read from ``cfg.s3_secret`` by reference: the Secret's name and keys, never a value."""
    if not cfg.s3_secret:
        return []
    out = []
    for key, optional in S3_SECRET_KEYS.items():
        ref: dict[str, Any] = {"name": cfg.s3_secret, "key": key}
        if optional:
            ref["optional"] = True
        out.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return out


def pod_security_context(cfg: LaunchConfig) -> dict[str, Any]:
    uid = cfg.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def capabilities(cfg: LaunchConfig) -> dict[str, list[str]]:
    """None but ``IPC_LOCK`` with an RDMA device (``launch.rdma_resource``): NCCL's InfiniBand / RoCE
    transport pins its buffers in memory, which needs the capability beyond the default memlock limit.
    Pod Security ``restricted`` and ``baseline`` refuse it, so it is off unless RDMA is asked for."""
    caps: dict[str, list[str]] = {"drop": ["ALL"]}
    if cfg.rdma_resource:
        caps["add"] = ["IPC_LOCK"]
    return caps


def container_security_context(cfg: LaunchConfig) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": cfg.run_as_user,
        "runAsGroup": cfg.run_as_user,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": cfg.read_only_root_filesystem,
        "capabilities": capabilities(cfg),
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(cfg: LaunchConfig) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volume, mount) pairs: sized memory-backed /dev/shm, plus writable /tmp and cache dirs."""
    shm = {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}}
    pairs = [(shm, {"name": SHM_VOLUME, "mountPath": "/dev/shm"})]
    if cfg.read_only_root_filesystem:
        pairs += [
            ({"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": TMP_DIR}),
            ({"name": "cache", "emptyDir": {}}, {"name": "cache", "mountPath": CACHE_DIR}),
        ]
    return pairs


def _merge_by_name(items: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {n["name"] for n in new}
    return [i for i in items if i["name"] not in names] + new


def apply_pod_policy(template: dict[str, Any], cfg: LaunchConfig) -> dict[str, Any]:
    """Set the m3i pod policy on a pod template ``{metadata, spec}`` with one container, in place.

    Args:
        template: A PodTemplateSpec as a plain dict (e.g. a Volcano task's ``template``).
        cfg: The launch section.

    Returns:
        ``template``, for chaining.
    """
    meta = template.setdefault("metadata", {})
    meta.setdefault("labels", {}).update(POD_LABELS)
    spec = template.setdefault("spec", {})
    (container,) = spec["containers"]

    spec["securityContext"] = pod_security_context(cfg)
    # Time for the SIGTERM save (launch.termination_grace_seconds) before Kubernetes kills the pod.
    spec["terminationGracePeriodSeconds"] = cfg.termination_grace_seconds
    # Training never calls the Kubernetes API; cloud IAM bindings use their own projected tokens.
    spec["automountServiceAccountToken"] = False
    # A Service named e.g. "master" would otherwise inject MASTER_PORT=tcp://... and break torchrun.
    spec["enableServiceLinks"] = False
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    if cfg.priority_class:
        spec["priorityClassName"] = cfg.priority_class
    if cfg.node_selector:
        spec["nodeSelector"] = dict(cfg.node_selector)
    else:
        spec.pop("nodeSelector", None)
    if cfg.tolerations:
        spec["tolerations"] = [parse_toleration(t) for t in cfg.tolerations]

    pairs = _volumes(cfg)
    spec["volumes"] = _merge_by_name(spec.get("volumes", []), [v for v, _ in pairs])
    container["volumeMounts"] = _merge_by_name(container.get("volumeMounts", []), [m for _, m in pairs])
    container["env"] = _merge_by_name(container.get("env", []), secret_env(cfg))
    container["resources"] = resources(cfg)
    container["securityContext"] = container_security_context(cfg)
    return template
