"""Run a training job on Kubernetes to completion: submit, follow, fail loudly, clean up.

    result = run_cluster_job(cfg, train_args)     # cfg.scheduler == "kubernetes"
    result.ok, result.state                        # SUCCEEDED / FAILED / CANCELLED

The pipeline's train step calls this: it creates the Volcano Job, PyTorchJob or TrainJob
that :func:`m3i.launch.render` renders, polls its status, streams the pods' logs prefixed
by pod name, and deletes the job when it ends, fails, times out or the step itself is
stopped (SIGTERM from Kubernetes or KFP). Every kind goes through the ``kubernetes``
client's CustomObjectsApi and CoreV1Api, which tests replace with fakes (``apis=``).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TextIO

from m3i.config.launch import KUEUE_QUEUE_LABEL, LaunchConfig

if TYPE_CHECKING:
    from m3i.launch import LaunchResult

__all__ = ["JOB_KINDS", "JobKind", "ClusterJob", "job_state", "run_cluster_job"]

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")

_VOLCANO_DONE = {"Completed": "SUCCEEDED", "Failed": "FAILED", "Aborted": "CANCELLED", "Terminated": "CANCELLED"}
_PYTORCHJOB_DONE = {"Succeeded": "SUCCEEDED", "Failed": "FAILED"}
# Failed first: the Trainer keeps a DeadlineExceeded failure whatever the JobSet says.
_TRAINJOB_DONE = {"Failed": "FAILED", "Complete": "SUCCEEDED"}
_JOB_COUNTS = ("active", "ready", "succeeded", "failed", "suspended")


def _is_true(cond: dict[str, Any]) -> bool:
    return str(cond.get("status")) == "True"


def _describe(cond: dict[str, Any], with_type: bool = True) -> str:
    parts = (cond.get("type", "") if with_type else "", cond.get("reason") or "", cond.get("message") or "")
    return " ".join(x for x in parts if x)


def _queued(job: dict[str, Any]) -> str:
    """What a suspended job labelled for Kueue waits for (Kueue suspends it until it admits it)."""
    queue = ((job.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    return f" (waiting for Kueue to admit it from LocalQueue {queue})" if queue else ""


def _volcano_state(job: dict[str, Any]) -> tuple[str, str]:
    """Volcano writes one phase, ``status.state.phase``."""
    st = (job.get("status") or {}).get("state") or {}
    phase = st.get("phase") or "Pending"
    detail = " ".join(x for x in (phase, st.get("reason") or "", st.get("message") or "") if x)
    if phase in _VOLCANO_DONE:
        return _VOLCANO_DONE[phase], detail
    return ("PENDING" if phase == "Pending" else "RUNNING"), detail


def _pytorchjob_state(job: dict[str, Any]) -> tuple[str, str]:
    """The Training Operator appends each changed condition; the last true one is the current phase.

    ``Suspended`` (``runPolicy.suspend``, which Kueue sets until it admits the job) is a wait,
    whichever condition comes last.
    """
    true = [c for c in (job.get("status") or {}).get("conditions") or [] if _is_true(c)]
    if not true:
        return "PENDING", "Created"
    detail = _describe(true[-1])
    for c in true:
        if c.get("type") in _PYTORCHJOB_DONE:
            return _PYTORCHJOB_DONE[c["type"]], detail
    suspended = [c for c in true if c.get("type") == "Suspended"]
    if suspended:
        return "PENDING", _describe(suspended[-1]) + _queued(job)
    return ("PENDING" if true[-1].get("type") == "Created" else "RUNNING"), detail


def _trainjob_state(job: dict[str, Any]) -> tuple[str, str]:
    """Kubeflow Trainer v2 sets only ``Complete`` and ``Failed`` (copied from the JobSet) and ``Suspended``.

    There is no Running condition: the job runs once a child Job counts as ready in
    ``status.jobsStatus`` (one entry per replicated job), i.e. all that Job's pods are ready or
    done; the Kubeflow SDK likewise calls a TrainJob running once all its node pods run. Until
    then it waits: suspended (by Kueue until it admits the job, or by ``spec.suspend``), then
    starting while its pods are created, scheduled and pulled.
    """
    status = job.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    for type_, state in _TRAINJOB_DONE.items():
        if type_ in conds and _is_true(conds[type_]):
            return state, _describe(conds[type_])
    suspended = conds.get("Suspended")
    if suspended and _is_true(suspended):
        return "PENDING", _describe(suspended) + _queued(job)
    jobs = status.get("jobsStatus") or []
    if not jobs:
        return "PENDING", _describe(suspended, with_type=False) if suspended else "Created"  # "Resumed TrainJob is resumed"
    counts = "; ".join(
        f"{j.get('name', '?')}: " + (", ".join(f"{j[k]} {k}" for k in _JOB_COUNTS if j.get(k)) or "0 active") for j in jobs
    )
    if any(j.get("ready") or j.get("succeeded") for j in jobs):
        progress = (status.get("trainerStatus") or {}).get("progressPercentage")
        return "RUNNING", f"Running {counts}" + ("" if progress is None else f", {progress}% done")
    return "PENDING", f"Starting {counts}"


@dataclass(frozen=True)
class JobKind:
    """Where a job kind lives in the Kubernetes API, how to read its state and how its pods are labelled."""

    group: str
    version: str
    plural: str
    pod_label: str
    """Label the operator puts on the job's pods, valued with the job's name."""
    state: Callable[[dict[str, Any]], tuple[str, str]]
    """``(state, detail)`` of a job object read from the API (see :func:`job_state`)."""


JOB_KINDS: dict[str, JobKind] = {
    "volcano": JobKind("batch.volcano.sh", "v1alpha1", "jobs", "volcano.sh/job-name", _volcano_state),
    "pytorchjob": JobKind("kubeflow.org", "v1", "pytorchjobs", "training.kubeflow.org/job-name", _pytorchjob_state),
    # A TrainJob runs as a JobSet of its own name, whose controller labels every pod with it.
    "trainjob": JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "jobset.sigs.k8s.io/jobset-name", _trainjob_state),
}


def job_state(kind: str, job: dict[str, Any]) -> tuple[str, str]:
    """``(state, detail)`` of a job object: state is PENDING, RUNNING or one of :data:`TERMINAL`.

    PENDING covers every wait before the pods run: not yet seen by its controller, queued
    or suspended (Kueue), pods being scheduled. Detail is the operator's own words (phase or
    condition, reason, message), for the log.

    Raises:
        KeyError: ``kind`` is not one of :data:`JOB_KINDS`.
    """
    return JOB_KINDS[kind].state(job)


def _load_apis() -> tuple[Any, Any]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


class ClusterJob:
    """One Volcano Job, PyTorchJob or TrainJob: create, read its state, follow its pods' logs, delete."""

    def __init__(self, kind: str, job: dict[str, Any], apis: tuple[Any, Any] | None = None) -> None:
        if kind not in JOB_KINDS:
            raise ValueError(f"launch.kind={kind!r} is not one of {sorted(JOB_KINDS)}")
        self.kind = kind
        self.spec = JOB_KINDS[kind]
        self.job = job
        self.namespace = job["metadata"]["namespace"]
        self.name = job["metadata"]["name"]
        self.custom, self.core = apis or _load_apis()
        self._followed: set[str] = set()  # pod uids: a pod recreated under its old name is a new pod
        self._threads: list[threading.Thread] = []

    @property
    def handle(self) -> str:
        return f"{self.namespace}:{self.name}"

    def _kw(self) -> dict[str, str]:
        return {"group": self.spec.group, "version": self.spec.version, "namespace": self.namespace, "plural": self.spec.plural}

    def create(self) -> None:
        resp = self.custom.create_namespaced_custom_object(body=self.job, **self._kw())
        self.name = resp["metadata"]["name"]

    def state(self) -> tuple[str, str]:
        return job_state(self.kind, self.custom.get_namespaced_custom_object(name=self.name, **self._kw()))

    def delete(self) -> None:
        """Delete the job and, through owner references, its pods; a job already gone is fine.

        Foreground propagation: the job goes only after its dependents, down the owner chain
        (a TrainJob's JobSet, its Jobs, their pods), so nothing of it is left running.
        """
        try:
            self.custom.delete_namespaced_custom_object(name=self.name, body={"propagationPolicy": "Foreground"}, **self._kw())
        except Exception as e:  # noqa: BLE001 - the kubernetes client raises ApiException(404) when gone
            if getattr(e, "status", None) != 404:
                raise

    def pods(self) -> list[Any]:
        sel = f"{self.spec.pod_label}={self.name}"
        return list(self.core.list_namespaced_pod(namespace=self.namespace, label_selector=sel).items)

    def follow_logs(self, out: TextIO, max_pods: int = 8) -> None:
        """Start a log-following thread for each started pod not followed yet, at most ``max_pods`` at once.

        Pods are told apart by uid: after a restart the operators recreate pods under the
        same names, and the new attempt's output (its traceback, say) must be streamed too.
        """
        for pod in sorted(self.pods(), key=lambda p: p.metadata.name):
            name = pod.metadata.name
            uid = getattr(pod.metadata, "uid", None) or name
            if uid in self._followed or sum(t.is_alive() for t in self._threads) >= max_pods:
                continue
            if pod.status.phase not in ("Running", "Succeeded", "Failed"):
                continue
            self._followed.add(uid)
            t = threading.Thread(target=self._stream, args=(name, out), daemon=True, name=f"log-{name}")
            t.start()
            self._threads.append(t)

    def _stream(self, pod: str, out: TextIO) -> None:
        try:
            resp = self.core.read_namespaced_pod_log(name=pod, namespace=self.namespace, follow=True, _preload_content=False)
            for raw in _lines(resp):
                out.write(f"{pod} {raw}\n")
                out.flush()
        except Exception as e:  # noqa: BLE001 - a lost log stream must not fail the job
            out.write(f"{pod} [log stream ended: {e}]\n")
            out.flush()

    def join_logs(self, timeout: float = 10.0) -> None:
        for t in self._threads:
            t.join(timeout=timeout)


def _lines(resp: Any) -> Iterable[str]:
    """Lines of a streamed pod log (urllib3 response) or of a plain string/list (fakes)."""
    if isinstance(resp, str):
        yield from resp.splitlines()
        return
    if isinstance(resp, (list, tuple)):
        yield from (str(x).rstrip("\n") for x in resp)
        return
    buf = b""
    for chunk in resp.stream(4096):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


class _Stop(Exception):
    pass


def run_cluster_job(
    cfg: LaunchConfig,
    train_args: Sequence[str],
    *,
    log_to: TextIO | None = None,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
    keep: bool = False,
    max_api_errors: int = 5,
    apis: tuple[Any, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    **app_kw: Any,
) -> "LaunchResult":
    """Submit the job ``cfg`` describes, follow it to the end and delete it.

    Args:
        cfg: The launch section; ``scheduler`` must be ``kubernetes``.
        train_args: Arguments of ``m3i train``.
        log_to: Where state changes and pod logs go (stdout by default).
        poll_s: Seconds between status reads.
        timeout_s: Give up (and delete the job) after this many seconds; ``None`` waits forever.
        keep: Leave the finished job in place (for debugging) instead of deleting it.
        max_api_errors: Consecutive failed status reads tolerated (one per poll) before giving up.
        apis: ``(CustomObjectsApi, CoreV1Api)``; the current kube context's by default.
        clock, sleep: Time sources (tests).
        **app_kw: ``module`` / ``subcommand`` of what torchrun runs.

    Returns:
        A :class:`m3i.launch.LaunchResult` whose ``state`` is SUCCEEDED, FAILED, CANCELLED or TIMEOUT.
    """
    from m3i.launch import LaunchResult, render

    out = log_to or sys.stdout
    job = ClusterJob(cfg.kind, render(cfg, train_args, **app_kw), apis)
    stopped: list[int] = []

    def on_term(signum: int, _frame: Any) -> None:
        stopped.append(signum)
        raise _Stop(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    state, last, created, errors = "PENDING", "", False, 0
    t0 = clock()
    try:
        job.create()
        created = True
        out.write(f"submitted {cfg.kind} {job.handle} ({cfg.nodes} x {cfg.ranks_per_node} processes)\n")
        out.flush()
        while True:
            try:
                state, detail = job.state()
                if state != "PENDING":
                    job.follow_logs(out)
                errors = 0
            except (_Stop, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - one API hiccup must not end a days-long job
                errors += 1
                if errors > max_api_errors:
                    raise
                out.write(f"{job.handle}: status read failed ({errors}/{max_api_errors}): {e}\n")
                sleep(poll_s)
                continue
            if detail != last:
                out.write(f"{job.handle}: {state} {detail}\n")
                out.flush()
                last = detail
            if state in TERMINAL:
                break
            if timeout_s is not None and clock() - t0 > timeout_s:
                state = "TIMEOUT"
                out.write(f"{job.handle}: no result after {timeout_s:.0f}s; deleting it\n")
                break
            sleep(poll_s)
    except (_Stop, KeyboardInterrupt):
        state = "CANCELLED"
        out.write(f"{job.handle}: step stopped ({'SIGTERM' if stopped else 'interrupt'}); deleting the job\n")
        keep = False
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if state in TERMINAL:
            job.join_logs()  # a finished pod's stream ends by itself: let it drain before the pods go
        if created and (not keep or state not in TERMINAL):
            try:
                job.delete()
                out.write(f"{job.handle}: deleted\n")
            except Exception as e:  # noqa: BLE001 - report, but keep the job's own result
                out.write(f"{job.handle}: delete failed: {e}\n")
        job.join_logs(timeout=2.0)
        out.flush()
    return LaunchResult(cfg.scheduler, state, handle=job.handle)
