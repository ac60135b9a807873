"""The training job as a Volcano ``batch.volcano.sh/v1alpha1 Job``, rendered by torchx.

torchx's kubernetes scheduler turns the AppDef into a Volcano Job (one task per node,
``svc``/``env`` plugins for peer discovery, RestartJob on PodFailed/PodEvicted). Its
dry-run request holds that Job; :func:`render_volcano` serialises it and applies
:func:`m3i.launch.pod.apply_pod_policy` to every task, and with ``launch.kueue`` Kueue's
queue label to the Job (Kueue has no built-in Volcano integration: the label takes effect
where an external-framework integration for ``batch.volcano.sh`` Jobs is set up). Submission goes through
``Runner.schedule`` with the patched request, the escape hatch torchx documents for
scheduler features its API lacks.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from torchx.runner import Runner, get_runner
from torchx.specs import AppDryRunInfo

from m3i.config.launch import LaunchConfig
from m3i.launch.pod import apply_pod_policy
from m3i.launch.torchx_app import build_appdef

__all__ = ["render_volcano", "submit_volcano", "scheduler_cfg"]


def scheduler_cfg(cfg: LaunchConfig) -> dict[str, str]:
    """Run options of torchx's kubernetes scheduler (``-cfg`` on its CLI)."""
    out = {"namespace": cfg.namespace, "queue": cfg.queue}
    if cfg.service_account:
        out["service_account"] = cfg.service_account
    if cfg.priority_class:
        out["priority_class"] = cfg.priority_class
    return out


def _dryrun(runner: Runner, cfg: LaunchConfig, train_args: Sequence[str], **app_kw: Any) -> tuple[AppDryRunInfo, dict[str, Any]]:
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    app = build_appdef(cfg, train_args, **app_kw)
    with warnings.catch_warnings():
        # torchx warns on any max_retries about a Volcano 1.4 retry bug; retries here are
        # job-level (RestartJob policies bounded by spec.maxRetry).
        warnings.filterwarnings("ignore", message=r"\s*Role .* configured with restarts", category=UserWarning)
        info = runner.dryrun(app, "kubernetes", cfg=scheduler_cfg(cfg), workspace=None)
    job = sanitize_for_serialization(info.request.resource)
    assert isinstance(job, dict)
    job["metadata"]["namespace"] = cfg.namespace
    if cfg.kueue:
        job["metadata"].setdefault("labels", {}).update(cfg.queue_labels())
    spec = job["spec"]
    spec["minAvailable"] = cfg.nodes  # gang: start all pods or none
    for task in spec["tasks"]:
        apply_pod_policy(task["template"], cfg)
    info.request.resource = job
    return info, job


def render_volcano(cfg: LaunchConfig, train_args: Sequence[str], **app_kw: Any) -> dict[str, Any]:
    """The Volcano Job that ``m3i launch`` would submit, as a plain dict (works offline).

    Args:
        cfg: The launch section (``scheduler: kubernetes``, ``kind: volcano``).
        train_args: Arguments of ``m3i train``.
        **app_kw: Passed to :func:`m3i.launch.torchx_app.build_appdef` (``module``, ``subcommand``).

    Returns:
        The ``batch.volcano.sh/v1alpha1`` Job; its name carries a unique suffix.
    """
    with get_runner() as runner:
        return _dryrun(runner, cfg, train_args, **app_kw)[1]


def submit_volcano(cfg: LaunchConfig, train_args: Sequence[str], **app_kw: Any) -> str:
    """Create the Volcano Job in the current kube context; returns torchx's app handle.

    Needs the ``kubernetes`` client, a reachable cluster with Volcano, and rights to create
    ``jobs.batch.volcano.sh`` in ``cfg.namespace``.
    """
    with get_runner() as runner:
        info, _ = _dryrun(runner, cfg, train_args, **app_kw)
        return runner.schedule(info)
