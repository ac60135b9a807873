"""``m3i launch``: run ``m3i train`` under torchrun, here or on Kubernetes.

    render(cfg, ["--preset", "default"])         # the Volcano Job, PyTorchJob or TrainJob, a dict
    launch(cfg, ["--preset", "default"], dryrun=True).rendered

Targets (``launch.scheduler`` / ``launch.kind``):

- ``local_cwd``: torchx's local scheduler runs ``nodes`` torchrun agents in the current
  folder, inheriting this environment (S3 credentials included); waits and returns the
  final state. Each replica's output is streamed back, prefixed ``role/replica``.
- ``kubernetes`` + ``volcano``: the torchx kubernetes scheduler's Volcano Job, with the pod
  policy of :mod:`m3i.launch.pod`; submitted through the torchx runner. For Volcano
  clusters: gang scheduling and Volcano queues.
- ``kubernetes`` + ``pytorchjob``: a Kubeflow Training Operator v1 PyTorchJob with the same
  pod; submitted with the kubernetes client's CustomObjectsApi. For legacy v1 clusters.
- ``kubernetes`` + ``trainjob``: a Kubeflow Trainer v2 TrainJob on the m3i runtime
  (``launch.runtime``), the pod policy as its runtime patch (:mod:`m3i.launch.trainjob`);
  submitted with the CustomObjectsApi. For Kubeflow Trainer v2 clusters, queued by Kueue
  with ``launch.kueue``.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

import yaml

from m3i.config.launch import LaunchConfig

__all__ = ["LaunchConfig", "LaunchResult", "build_appdef", "launch", "render", "to_yaml"]

_OK_STATES = ("DRYRUN", "SUBMITTED", "SUCCEEDED")

# A rank's own last word: m3i's one-line errors, or the last line of a Python traceback.
# torchelastic's ChildFailedError report, which names no cause, is not one.
_ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?(m3i [a-z-]+: (?:error|failed): .*|(?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception)(?::.*)?)$")
_NOT_A_CAUSE = ("ChildFailedError", "torch.distributed.elastic")


def __getattr__(name: str) -> Any:
    # torchx is imported only when a launch needs it: `m3i pipeline` runs where it is absent.
    if name == "build_appdef":
        from m3i.launch.torchx_app import build_appdef

        return build_appdef
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class LaunchResult:
    """What a launch did."""

    scheduler: str
    """``local_cwd`` or ``kubernetes``."""

    state: str
    """``DRYRUN``, ``SUBMITTED`` (Kubernetes; not waited for) or torchx's final AppState name
    (``SUCCEEDED``, ``FAILED``, ``CANCELLED``, ...) of a local run."""

    handle: str | None = None
    """torchx app handle or ``namespace:name`` of the submitted job; ``None`` on a dry run."""

    rendered: str | None = None
    """The dry run: YAML of the Kubernetes object, or torchx's description of the local processes."""

    @property
    def ok(self) -> bool:
        return self.state in _OK_STATES

    @property
    def exit_code(self) -> int:
        """0 when the launch succeeded, else 1."""
        return 0 if self.ok else 1


def render(cfg: LaunchConfig, train_args: Sequence[str], **app_kw: Any) -> dict[str, Any]:
    """The Kubernetes object ``m3i launch`` would submit for ``cfg.kind``.

    Args:
        cfg: The launch section; ``cfg.scheduler`` must be ``kubernetes``.
        train_args: Arguments of ``m3i train``.
        **app_kw: ``module`` / ``subcommand`` overrides of what torchrun runs.

    Returns:
        A ``batch.volcano.sh/v1alpha1`` Job, a ``kubeflow.org/v1`` PyTorchJob or a
        ``trainer.kubeflow.org/v1alpha1`` TrainJob.

    Raises:
        ValueError: When ``cfg.scheduler`` is not ``kubernetes``.
    """
    if cfg.scheduler != "kubernetes":
        raise ValueError(f"launch.scheduler={cfg.scheduler!r} renders no Kubernetes object; set launch.scheduler=kubernetes")
    if cfg.kind == "pytorchjob":
        from m3i.launch.pytorchjob import render_pytorchjob

        return render_pytorchjob(cfg, train_args, **app_kw)
    if cfg.kind == "trainjob":
        from m3i.launch.trainjob import render_trainjob

        return render_trainjob(cfg, train_args, **app_kw)
    from m3i.launch.volcano import render_volcano

    return render_volcano(cfg, train_args, **app_kw)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    """Block-style YAML of a rendered object, keys in their rendered order, no anchors."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


def launch(
    cfg: LaunchConfig,
    train_args: Sequence[str],
    dryrun: bool = False,
    *,
    module: str = "m3i",
    subcommand: str | None = "train",
    wait_interval: float = 0.5,
    log: TextIO | None = None,
) -> LaunchResult:
    """Run, submit or dry-run the training job that ``cfg`` describes.

    Args:
        cfg: The launch section.
        train_args: Arguments of ``m3i train``, passed through verbatim.
        dryrun: Only render what would run.
        module: Python module torchrun runs (``m3i``; tests use a probe).
        subcommand: First argument of the module (``train``), or ``None``.
        wait_interval: Seconds between status polls of a local run.
        log: Where a local run's output goes, each line prefixed ``role/replica``; stdout by default.

    Returns:
        A :class:`LaunchResult`; ``exit_code`` is 0 on success.

    Raises:
        ImportError: Submitting to Kubernetes without the ``kubernetes`` client.
    """
    app_kw = {"module": module, "subcommand": subcommand}
    if cfg.scheduler == "local_cwd":
        return _run_local(cfg, train_args, dryrun, wait_interval, log, app_kw)
    if cfg.kind == "pytorchjob":
        from m3i.launch.pytorchjob import render_pytorchjob, submit_pytorchjob

        job = render_pytorchjob(cfg, train_args, **app_kw)
        if dryrun:
            return LaunchResult(cfg.scheduler, "DRYRUN", rendered=to_yaml(job))
        return LaunchResult(cfg.scheduler, "SUBMITTED", handle=submit_pytorchjob(job))
    if cfg.kind == "trainjob":
        from m3i.launch.trainjob import render_trainjob, submit_trainjob

        job = render_trainjob(cfg, train_args, **app_kw)
        if dryrun:
            return LaunchResult(cfg.scheduler, "DRYRUN", rendered=to_yaml(job))
        return LaunchResult(cfg.scheduler, "SUBMITTED", handle=submit_trainjob(job))
    from m3i.launch.volcano import render_volcano, submit_volcano

    if dryrun:
        return LaunchResult(cfg.scheduler, "DRYRUN", rendered=to_yaml(render_volcano(cfg, train_args, **app_kw)))
    return LaunchResult(cfg.scheduler, "SUBMITTED", handle=submit_volcano(cfg, train_args, **app_kw))


def _run_local(
    cfg: LaunchConfig, train_args: Sequence[str], dryrun: bool, wait_interval: float, log: TextIO | None, app_kw: dict[str, Any]
) -> LaunchResult:
    from torchx.runner import get_runner

    from m3i.launch.torchx_app import build_appdef

    app = build_appdef(cfg, train_args, **app_kw)
    with get_runner() as runner:
        if dryrun:
            return LaunchResult(cfg.scheduler, "DRYRUN", rendered=str(runner.dryrun(app, "local_cwd", cfg={})))
        handle = runner.run(app, "local_cwd", cfg={})
        role = app.roles[0]
        out = log or sys.stdout
        last_errors: dict[int, str] = {}
        # local_cwd writes each replica's output to files in a temp folder it deletes on close:
        # tail them while the job runs.
        tails = [
            threading.Thread(target=_tail, args=(runner, handle, role.name, k, out, last_errors), daemon=True)
            for k in range(role.num_replicas)
        ]
        for t in tails:
            t.start()
        try:
            status = runner.wait(handle, wait_interval=wait_interval)
        except BaseException:
            runner.cancel(handle)
            raise
        for t in tails:
            t.join(timeout=10)
    state = status.state.name if status else "UNKNOWN"
    if state != "SUCCEEDED":
        # torchrun's own report ends the log and names no cause: repeat each replica's last error.
        for k in sorted(last_errors):
            out.write(f"m3i launch: {role.name}/{k} failed with: {last_errors[k]}\n")
        out.flush()
    return LaunchResult(cfg.scheduler, state, handle=handle)


def last_error_line(line: str) -> str | None:
    """``line`` stripped when it states a cause of failure (an m3i error line or an exception), else ``None``."""
    text = line.strip()
    if not _ERROR_LINE.match(text) or any(t in text for t in _NOT_A_CAUSE):
        return None
    return text


def _tail(runner: Any, handle: str, role: str, replica: int, out: TextIO, last_errors: dict[int, str] | None = None) -> None:
    from torchx.schedulers.api import Stream

    try:
        for line in runner.log_lines(handle, role, replica, should_tail=True, streams=Stream.COMBINED):
            out.write(f"{role}/{replica} {line}" if line.endswith("\n") else f"{role}/{replica} {line}\n")
            out.flush()
            if last_errors is not None and (cause := last_error_line(line)):
                last_errors[replica] = cause
    except Exception as e:  # a lost log must not fail the run; say so and go on
        out.write(f"{role}/{replica} [log stream ended: {e}]\n")
