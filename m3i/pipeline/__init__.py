"""The Kubeflow pipeline ``m3i-pretrain``: shard -> train -> export -> evaluate -> gate -> promote.

The step logic is in :mod:`m3i.pipeline.steps` (the gate and the champion pointer's steps in
:mod:`m3i.pipeline.promotion`); the KFP components that call it and the
pipeline that wires them are in ``components/`` (importable as ``m3i_components``);
:mod:`m3i.pipeline.build` compiles and versions it, :mod:`m3i.pipeline.kfp_client` talks to
a KFP endpoint, :mod:`m3i.pipeline.local` runs it on this machine with ``kfp.local``.
"""

from __future__ import annotations

from m3i import __version__

__all__ = ["PIPELINE_NAME", "CPU_IMAGE", "TRAIN_IMAGE", "S3_SECRET", "REGISTRY_SECRET", "LAUNCH_CONFIGMAP", "CONFIG_MOUNT"]

PIPELINE_NAME = "m3i-pretrain"
"""The pipeline's name in KFP; its versions are named by :func:`m3i.pipeline.build.version_name`."""

CPU_IMAGE = f"ghcr.io/m3i-project/m3i:{__version__}"
"""Base image of the CPU steps (plan, shard, export, evaluate, the job-launching train step): docker/Dockerfile."""

TRAIN_IMAGE = f"ghcr.io/m3i-project/m3i-train:{__version__}"
"""Base image of the train step (CUDA, DeepSpeed): docker/Dockerfile.train."""

S3_SECRET = "m3i-s3"
"""Secret whose keys become the steps' S3 env (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""

REGISTRY_SECRET = "m3i-model-registry"
"""Optional Secret whose key ``token`` becomes the promote steps' ``M3I_MODEL_REGISTRY_TOKEN``
(``promote.registry.token_env``): the Kubeflow Model Registry's bearer token, by reference only."""

LAUNCH_CONFIGMAP = "m3i-launch"
"""ConfigMap (manifests/, helm/) with the cluster's config file ``m3i.yaml``; mounted optional."""

CONFIG_MOUNT = "/etc/m3i"
"""Where that ConfigMap is mounted; ``M3I_CONFIG`` points at ``m3i.yaml`` in it."""
