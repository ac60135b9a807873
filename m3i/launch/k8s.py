"""What the Kubernetes job kinds share: unique names, ``$(VAR)`` escaping, submission.

Only :func:`create_custom_object` talks to a cluster (through the ``kubernetes`` client, in-cluster
config first, then the kube context); the rest is pure and works offline.
"""

from __future__ import annotations

from typing import Any

from m3i.config.launch import LaunchConfig

__all__ = ["create_custom_object", "escape_refs", "unique_job_name"]


def escape_refs(arg: str) -> str:
    """``arg`` with ``$(`` doubled: Kubernetes expands ``$(NAME)`` in command and args, ``$$`` keeps a literal one."""
    return arg.replace("$(", "$$(")


def unique_job_name(cfg: LaunchConfig) -> str:
    """``cfg.name`` plus torchx's unique suffix, as every kind names its job."""
    from torchx.schedulers.ids import make_unique

    return make_unique(cfg.name)


def create_custom_object(job: dict[str, Any], plural: str) -> str:
    """Create a rendered custom resource in its namespace; returns ``namespace:name``.

    Group and version come from the object's ``apiVersion``. Needs the ``kubernetes`` client,
    a reachable cluster serving the resource, and rights to create ``plural`` there.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    group, version = job["apiVersion"].split("/")
    ns = job["metadata"]["namespace"]
    resp = client.CustomObjectsApi().create_namespaced_custom_object(
        group=group, version=version, namespace=ns, plural=plural, body=job
    )
    return f"{ns}:{resp['metadata']['name']}"
