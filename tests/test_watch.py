"""run_cluster_job: create the Volcano Job, PyTorchJob or TrainJob, follow its status and pod logs, delete it.

The kubernetes client's CustomObjectsApi and CoreV1Api are replaced by in-memory fakes whose
job status walks through a script, one entry per status read; time is a fake clock that
``sleep`` advances, so nothing waits and nothing reaches a cluster. The statuses are written
as the operators write them (Volcano, Training Operator v1.9, Kubeflow Trainer v2.3 on
JobSet v0.12); the TrainJob ones are checked against the Trainer's CRD.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import os
import signal
import threading
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from m3i.config.launch import KINDS, KUEUE_QUEUE_LABEL, LaunchConfig
from m3i.launch import render
from m3i.launch.watch import JOB_KINDS, ClusterJob, job_state, run_cluster_job
from tests.k8s_schema import assert_valid

TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"

TRAIN_ARGS = ["--preset", "default", "--set", "train.steps=10"]


def cluster_cfg(kind: str = "volcano", **kw: Any) -> LaunchConfig:
    return LaunchConfig(scheduler="kubernetes", kind=kind, nodes=2, nproc_per_node=1, namespace="m3i", **kw)


def _bind(api: type, method: str, kw: dict[str, Any]) -> None:
    """Fail like the real client on a missing required argument of ``api.method``."""
    inspect.signature(getattr(api, method)).bind(None, **kw)


# --- job statuses, as the operators write them ----------------------------------------------


def volcano(phase: str, reason: str = "", message: str = "") -> dict[str, Any]:
    state = {"phase": phase, "lastTransitionTime": "2025-01-01T00:00:00Z"}
    if reason:
        state["reason"] = reason
    if message:
        state["message"] = message
    return {"state": state, "minAvailable": 2}


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason or f"PyTorchJob{type_}", "message": message or f"job is {type_.lower()}"}


def pytorchjob(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"conditions": list(conditions), "replicaStatuses": {"Master": {"active": 1}}}


# Kubeflow Trainer v2.3 (pkg/apis/trainer/v1alpha1/trainjob_types.go, pkg/controller/trainjob_controller.go):
# metav1.Conditions Suspended (reason Suspended / Resumed), Complete and Failed, the last two copied
# from the JobSet's Completed / Failed (reasons of JobSet v0.12, pkg/constants/constants.go); and
# jobsStatus, one entry per replicated job, counting child Jobs, not pods.


def tcond(type_: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": "2025-01-01T00:00:00Z"}


def trainjob(*conditions: dict[str, Any], progress: int | None = None, **counts: int) -> dict[str, Any]:
    """A TrainJob status; ``counts`` (active=1, ready=1, ...) make the ``node`` replicated job's entry."""
    status: dict[str, Any] = {}
    if conditions:
        status["conditions"] = list(conditions)
    if counts:
        status["jobsStatus"] = [{"name": "node", **{k: counts.get(k, 0) for k in ("active", "ready", "succeeded", "failed", "suspended")}}]
    if progress is not None:
        status["trainerStatus"] = {"progressPercentage": progress, "lastUpdatedTime": "2025-01-01T01:00:00Z"}
    return status


SUSPENDED = tcond("Suspended", "Suspended", "TrainJob is suspended")
RESUMED = tcond("Suspended", "Resumed", "TrainJob is resumed", status="False")
COMPLETE = tcond("Complete", "AllJobsCompleted", "jobset completed successfully")
MAX_RESTARTS = tcond("Failed", "ReachedMaxRestarts", "jobset failed due to reaching max number of restarts (first failed job: j-node-0)")
DEADLINE = tcond("Failed", "DeadlineExceeded", "TrainJob exceeded its active deadline")

CREATED = cond("Created")
RUN_OK = {
    "volcano": [volcano("Pending"), volcano("Running"), volcano("Running"), volcano("Completed")],
    "pytorchjob": [
        {},
        pytorchjob(CREATED, cond("Running")),
        pytorchjob(CREATED, cond("Running")),
        pytorchjob(CREATED, cond("Running", "False"), cond("Succeeded")),
    ],
    "trainjob": [{}, trainjob(active=1, ready=1), trainjob(active=1, ready=1), trainjob(COMPLETE, succeeded=1)],
}
RUN_FAILED = {
    "volcano": [volcano("Running"), volcano("Failed", "PodFailed", "task m3i-1 failed 6 times")],
    "pytorchjob": [
        pytorchjob(CREATED, cond("Running")),
        pytorchjob(CREATED, cond("Running", "False"), cond("Failed", message="master-0 exited with code 1")),
    ],
    "trainjob": [trainjob(active=1, ready=1), trainjob(MAX_RESTARTS, failed=1)],
}
FAILED_DETAIL = {"volcano": "failed 6 times", "pytorchjob": "exited with code 1", "trainjob": "reaching max number of restarts"}


# --- fakes -------------------------------------------------------------------------------------


class FakeCustomObjects:
    """CustomObjectsApi in memory: the i-th status read returns ``statuses[i]`` (the last one repeats)."""

    def __init__(self, statuses: list[dict[str, Any]], *, create_error: Exception | None = None,
                 delete_error: Exception | None = None) -> None:
        self.statuses = statuses
        self.create_error = create_error
        self.delete_error = delete_error
        self.created: list[dict[str, Any]] = []
        self.reads: list[dict[str, Any]] = []
        self.deleted: list[dict[str, Any]] = []

    def create_namespaced_custom_object(self, **kw: Any) -> dict[str, Any]:
        _bind(client.CustomObjectsApi, "create_namespaced_custom_object", kw)
        self.created.append(copy.deepcopy(kw))
        if self.create_error:
            raise self.create_error
        return copy.deepcopy(kw["body"])  # the API server echoes the object it stored

    def get_namespaced_custom_object(self, **kw: Any) -> dict[str, Any]:
        """The stored object (labels included) with the script's next status."""
        _bind(client.CustomObjectsApi, "get_namespaced_custom_object", kw)
        status = self.statuses[min(len(self.reads), len(self.statuses) - 1)]
        self.reads.append(kw)
        stored = self.created[-1]["body"] if self.created else {"metadata": {"name": kw["name"], "namespace": kw["namespace"]}}
        return {**copy.deepcopy(stored), "status": copy.deepcopy(status)}

    def delete_namespaced_custom_object(self, **kw: Any) -> dict[str, Any]:
        _bind(client.CustomObjectsApi, "delete_namespaced_custom_object", kw)
        self.deleted.append(kw)
        if self.delete_error:
            raise self.delete_error
        return {"status": "Success"}


def pod(name: str, phase: str, uid: str = "") -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(name=name, uid=uid or f"uid-{name}"), status=SimpleNamespace(phase=phase))


class FakeCore:
    """CoreV1Api in memory: a list of pods (or a function giving it) and each pod's log.

    A log is a string, a list of lines, an object with ``stream()`` (what the client returns
    with ``_preload_content=False``), or an exception to raise.
    """

    def __init__(self, pods: list[SimpleNamespace] | Callable[[], list[SimpleNamespace]] = (), logs: dict[str, Any] | None = None) -> None:
        self._pods = pods
        self.logs = logs or {}
        self.listed: list[dict[str, Any]] = []
        self.log_reads: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def list_namespaced_pod(self, **kw: Any) -> SimpleNamespace:
        _bind(client.CoreV1Api, "list_namespaced_pod", kw)
        self.listed.append(kw)
        return SimpleNamespace(items=list(self._pods() if callable(self._pods) else self._pods))

    def read_namespaced_pod_log(self, **kw: Any) -> Any:
        _bind(client.CoreV1Api, "read_namespaced_pod_log", kw)
        with self._lock:  # called from the log threads
            self.log_reads.append(kw)
        log = self.logs.get(kw["name"], "")
        if isinstance(log, BaseException):
            raise log
        return log


class FakeStream:
    """A urllib3 response read with ``stream()``: chunks that split lines anywhere, then maybe an error."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error

    def stream(self, amt: int):
        yield from self.chunks
        if self.error:
            raise self.error


class FakeTime:
    """``clock`` and ``sleep`` of a run: sleeping moves the clock, instantly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def previous_handler():
    """A SIGTERM handler of our own in place before the run; the process's own restored after the test."""
    assert threading.current_thread() is threading.main_thread()

    def handler(signum, frame):  # pragma: no cover - only its identity matters
        pass

    original = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, original)


def run(kind: str, custom: FakeCustomObjects, core: FakeCore | None = None, clock: FakeTime | None = None,
        cfg: LaunchConfig | None = None, **kw: Any):
    """``run_cluster_job`` against the fakes; returns ``(result, log text, job name)``."""
    out = io.StringIO()
    clock = clock or FakeTime()
    kw.setdefault("sleep", clock.sleep)
    result = run_cluster_job(
        cfg or cluster_cfg(kind), TRAIN_ARGS, log_to=out, poll_s=10, apis=(custom, core or FakeCore()), clock=clock.clock, **kw
    )
    name = custom.created[0]["body"]["metadata"]["name"] if custom.created else None
    return result, out.getvalue(), name


def lines_of(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --- job_state ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, want",
    [
        ({}, ("PENDING", "Pending")),  # just created: the controller has not written a status yet
        (volcano("Pending"), ("PENDING", "Pending")),
        (volcano("Running"), ("RUNNING", "Running")),
        (volcano("Restarting", "PodEvicted", "pod m3i-0 evicted"), ("RUNNING", "Restarting PodEvicted pod m3i-0 evicted")),
        (volcano("Completing"), ("RUNNING", "Completing")),
        (volcano("Completed"), ("SUCCEEDED", "Completed")),
        (volcano("Failed", "PodFailed", "task m3i-1 failed"), ("FAILED", "Failed PodFailed task m3i-1 failed")),
        (volcano("Aborted"), ("CANCELLED", "Aborted")),
        (volcano("Terminated", "", "by user"), ("CANCELLED", "Terminated by user")),
    ],
)
def test_job_state_of_volcano_phases(status, want):
    job = {"apiVersion": "batch.volcano.sh/v1alpha1", "kind": "Job", "metadata": {"name": "j"}}
    if status:
        job["status"] = status
    assert job_state("volcano", job) == want


@pytest.mark.parametrize(
    "status, want",
    [
        (None, ("PENDING", "Created")),
        ({}, ("PENDING", "Created")),
        (pytorchjob(), ("PENDING", "Created")),
        (pytorchjob(cond("Created", reason="PyTorchJobCreated", message="PyTorchJob m3i/j is created.")),
         ("PENDING", "Created PyTorchJobCreated PyTorchJob m3i/j is created.")),
        (pytorchjob(CREATED, cond("Running", reason="PyTorchJobRunning", message="PyTorchJob m3i/j is running.")),
         ("RUNNING", "Running PyTorchJobRunning PyTorchJob m3i/j is running.")),
        (pytorchjob(CREATED, cond("Running", "False"), cond("Succeeded", message="done")),
         ("SUCCEEDED", "Succeeded PyTorchJobSucceeded done")),
        (pytorchjob(CREATED, cond("Running", "False"), cond("Failed", message="master-0 exited with code 1")),
         ("FAILED", "Failed PyTorchJobFailed master-0 exited with code 1")),
        # The Training Operator drops Running when Restarting becomes true, and the other way round.
        (pytorchjob(CREATED, cond("Restarting", message="worker-0 evicted")),
         ("RUNNING", "Restarting PyTorchJobRestarting worker-0 evicted")),
        # After a restart Running is the last true condition again (a stale Restarting=False is ignored).
        (pytorchjob(CREATED, cond("Restarting", "False"), cond("Running")), ("RUNNING", "Running PyTorchJobRunning job is running")),
        # Conditions that are not true do not count, whatever their type.
        (pytorchjob(CREATED, cond("Failed", "False"), cond("Succeeded", "Unknown")), ("PENDING", "Created PyTorchJobCreated job is created")),
        # runPolicy.suspend (Kueue's hold until admission): the operator adds Suspended, a wait.
        (pytorchjob(CREATED, cond("Suspended", reason="PyTorchJobSuspended", message="PyTorchJob m3i/j is suspended.")),
         ("PENDING", "Suspended PyTorchJobSuspended PyTorchJob m3i/j is suspended.")),
        # Suspended while running (Kueue preemption): Running turns false, the job waits again.
        (pytorchjob(CREATED, cond("Running", "False", reason="PyTorchJobSuspended"), cond("Suspended", reason="PyTorchJobSuspended")),
         ("PENDING", "Suspended PyTorchJobSuspended job is suspended")),
        # Admitted: Suspended turns false (Resumed) and the job is Created until its pods run.
        (pytorchjob(CREATED, cond("Suspended", "False", reason="PyTorchJobResumed", message="PyTorchJob m3i/j is resumed.")),
         ("PENDING", "Created PyTorchJobCreated job is created")),
        (pytorchjob(CREATED, cond("Suspended", "False", reason="PyTorchJobResumed"), cond("Running")),
         ("RUNNING", "Running PyTorchJobRunning job is running")),
    ],
)
def test_job_state_of_pytorchjob_conditions(status, want):
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"}}
    if status is not None:
        job["status"] = status
    assert job_state("pytorchjob", job) == want


TRAINJOB_STATES = [
    (None, ("PENDING", "Created")),  # just created: the Trainer has not written a status yet
    (trainjob(SUSPENDED), ("PENDING", "Suspended Suspended TrainJob is suspended")),
    # Kueue keeps its JobSet's Jobs suspended too.
    (trainjob(SUSPENDED, suspended=1), ("PENDING", "Suspended Suspended TrainJob is suspended")),
    (trainjob(RESUMED), ("PENDING", "Resumed TrainJob is resumed")),  # admitted, no Job yet
    (trainjob(RESUMED, active=1), ("PENDING", "Starting node: 1 active")),  # pods pending: scheduled, pulling
    (trainjob(active=1), ("PENDING", "Starting node: 1 active")),
    (trainjob(active=0), ("PENDING", "Starting node: 0 active")),  # a JobSet restart recreates its Jobs
    (trainjob(RESUMED, active=1, ready=1), ("RUNNING", "Running node: 1 active, 1 ready")),
    (trainjob(active=1, ready=1, progress=42), ("RUNNING", "Running node: 1 active, 1 ready, 42% done")),
    (trainjob(COMPLETE, succeeded=1), ("SUCCEEDED", "Complete AllJobsCompleted jobset completed successfully")),
    (trainjob(MAX_RESTARTS, failed=1),
     ("FAILED", "Failed ReachedMaxRestarts jobset failed due to reaching max number of restarts (first failed job: j-node-0)")),
    (trainjob(tcond("Failed", "FailedJobs", "jobset failed due to one or more job failures (first failed job: j-node-0)"), failed=1),
     ("FAILED", "Failed FailedJobs jobset failed due to one or more job failures (first failed job: j-node-0)")),
    # activeDeadlineSeconds: the Trainer fails the job and deletes its JobSet, whatever else it says.
    (trainjob(RESUMED, DEADLINE, active=1, ready=1), ("FAILED", "Failed DeadlineExceeded TrainJob exceeded its active deadline")),
]


@pytest.mark.parametrize("status, want", TRAINJOB_STATES)
def test_job_state_of_trainjob_conditions(status, want):
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "j"}}
    if status is not None:
        job["status"] = status
    assert job_state("trainjob", job) == want


@pytest.mark.parametrize("status", [s for s, _ in TRAINJOB_STATES if s] + [s for s in RUN_OK["trainjob"] + RUN_FAILED["trainjob"] if s])
def test_trainjob_statuses_here_are_valid_per_the_crd(status):
    """The statuses these tests feed job_state are ones the TrainJob CRD (v2.3.0) accepts."""
    assert_valid({**render(cluster_cfg("trainjob"), TRAIN_ARGS), "status": status}, TRAINJOB_CRD)


@pytest.mark.parametrize("kind, status", [
    ("trainjob", trainjob(SUSPENDED)),
    ("pytorchjob", pytorchjob(CREATED, cond("Suspended", reason="PyTorchJobSuspended", message="PyTorchJob m3i/j is suspended."))),
])
def test_a_suspended_job_labelled_for_kueue_waits_for_admission(kind, status):
    job = {"metadata": {"name": "j", "labels": {KUEUE_QUEUE_LABEL: "training"}}, "status": status}
    state, detail = job_state(kind, job)
    assert state == "PENDING" and detail.endswith(" (waiting for Kueue to admit it from LocalQueue training)")


def test_trainjob_pods_are_found_by_their_jobset():
    """Kubeflow Trainer names the TrainJob's JobSet after it; JobSet labels each pod with the JobSet's name."""
    spec = JOB_KINDS["trainjob"]
    assert (spec.group, spec.version, spec.plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
    core = FakeCore()
    ClusterJob("trainjob", render(cluster_cfg("trainjob"), TRAIN_ARGS, job_name="m3i-train-x1"), apis=(FakeCustomObjects([{}]), core)).pods()
    assert core.listed == [{"namespace": "m3i", "label_selector": "jobset.sigs.k8s.io/jobset-name=m3i-train-x1"}]


@pytest.mark.parametrize("kind", KINDS)
def test_job_kinds_match_what_render_produces(kind):
    assert set(JOB_KINDS) == set(KINDS)
    spec = JOB_KINDS[kind]
    job = render(cluster_cfg(kind), TRAIN_ARGS)
    assert job["apiVersion"] == f"{spec.group}/{spec.version}"
    assert spec.plural == job["kind"].lower() + "s"


# --- a whole run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_success_submits_follows_streams_and_deletes(kind, previous_handler):
    custom = FakeCustomObjects(RUN_OK[kind])
    core = FakeCore(
        pods=[pod("p-1", "Running"), pod("p-0", "Running"), pod("p-9", "Pending")],
        logs={"p-0": "hello\nstep 1 loss=2.0\n", "p-1": ["rank 1 up\n", "step 1"], "p-9": "never read"},
    )
    clock = FakeTime()
    result, out, name = run(kind, custom, core, clock)

    spec = JOB_KINDS[kind]
    (created,) = custom.created
    assert (created["group"], created["version"], created["plural"], created["namespace"]) == (spec.group, spec.version, spec.plural, "m3i")
    # The body is what render() gives for this config (up to the job's unique name).
    expected = render(cluster_cfg(kind), TRAIN_ARGS)
    assert json.dumps(created["body"], sort_keys=True) == json.dumps(expected, sort_keys=True).replace(expected["metadata"]["name"], name)

    assert result.ok and result.exit_code == 0
    assert (result.scheduler, result.state, result.handle) == ("kubernetes", "SUCCEEDED", f"m3i:{name}")
    # Status read by name in the job's group/version/plural/namespace until it ended; one sleep per poll.
    assert [r["name"] for r in custom.reads] == [name] * 4
    assert {(r["group"], r["version"], r["plural"], r["namespace"]) for r in custom.reads} == {(spec.group, spec.version, spec.plural, "m3i")}
    assert clock.sleeps == [10, 10, 10]
    # Deleted at the end, with its pods (foreground propagation).
    (deleted,) = custom.deleted
    assert deleted["name"] == name and deleted["namespace"] == "m3i" and deleted["plural"] == spec.plural
    assert deleted["body"] == {"propagationPolicy": "Foreground"}

    assert out.startswith(f"submitted {kind} m3i:{name} (2 x 1 processes)\n")
    states = lines_of(out, f"m3i:{name}: ")
    assert [s.split()[1] for s in states] == ["PENDING", "RUNNING", "SUCCEEDED", "deleted"]  # a line per change, not per poll
    # Each running pod is followed once, its lines prefixed by its name; a pending pod is not followed.
    assert lines_of(out, "p-0 ") == ["p-0 hello", "p-0 step 1 loss=2.0"]
    assert lines_of(out, "p-1 ") == ["p-1 rank 1 up", "p-1 step 1"]
    assert "never read" not in out
    assert sorted(r["name"] for r in core.log_reads) == ["p-0", "p-1"]
    assert all(r["namespace"] == "m3i" and r["follow"] is True and r["_preload_content"] is False for r in core.log_reads)
    assert {(c["namespace"], c["label_selector"]) for c in core.listed} == {("m3i", f"{spec.pod_label}={name}")}
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_pods_are_not_listed_while_the_job_is_pending():
    custom = FakeCustomObjects([volcano("Pending"), volcano("Pending"), volcano("Completed")])
    core = FakeCore(pods=[pod("p-0", "Succeeded")], logs={"p-0": "done\n"})
    result, out, _ = run("volcano", custom, core)
    assert result.state == "SUCCEEDED"
    assert len(core.listed) == 1  # only at the end; a completed pod's log is still read
    assert lines_of(out, "p-0 ") == ["p-0 done"]


def test_streamed_log_is_split_into_lines_across_chunks():
    custom = FakeCustomObjects([volcano("Completed")])
    core = FakeCore(pods=[pod("p-0", "Failed")], logs={"p-0": FakeStream([b"ep", b"och 1\nepo", b"ch 2\n", b"\xff tail"])})
    result, out, _ = run("volcano", custom, core)
    assert lines_of(out, "p-0 ") == ["p-0 epoch 1", "p-0 epoch 2", "p-0 \ufffd tail"]
    assert result.ok


@pytest.mark.parametrize("kind", KINDS)
def test_failed_job_is_reported_and_deleted(kind):
    custom = FakeCustomObjects(RUN_FAILED[kind])
    core = FakeCore(pods=[pod("p-0", "Failed")], logs={"p-0": "Traceback: boom\n"})
    result, out, name = run(kind, custom, core)
    assert (result.state, result.ok, result.exit_code, result.handle) == ("FAILED", False, 1, f"m3i:{name}")
    assert len(custom.deleted) == 1
    failed = lines_of(out, f"m3i:{name}: FAILED")
    assert len(failed) == 1 and FAILED_DETAIL[kind] in failed[0]
    assert "p-0 Traceback: boom" in out.splitlines()


@pytest.mark.parametrize("kind, statuses, state", [
    ("volcano", RUN_OK["volcano"], "SUCCEEDED"),
    ("pytorchjob", RUN_OK["pytorchjob"], "SUCCEEDED"),
    ("trainjob", RUN_OK["trainjob"], "SUCCEEDED"),
    ("volcano", RUN_FAILED["volcano"], "FAILED"),
    ("trainjob", RUN_FAILED["trainjob"], "FAILED"),
    ("volcano", [volcano("Aborted")], "CANCELLED"),
])
def test_keep_leaves_a_finished_job(kind, statuses, state):
    custom = FakeCustomObjects(statuses)
    result, out, name = run(kind, custom, keep=True)
    assert result.state == state
    assert custom.deleted == [] and "deleted" not in out


@pytest.mark.parametrize("keep", [False, True])
def test_timeout_deletes_the_job_even_with_keep(keep):
    custom = FakeCustomObjects([volcano("Pending"), volcano("Running")])
    clock = FakeTime()
    result, out, name = run("volcano", custom, clock=clock, timeout_s=30, keep=keep)
    assert (result.state, result.ok, result.exit_code) == ("TIMEOUT", False, 1)
    assert len(custom.deleted) == 1 and f"m3i:{name}: deleted" in out
    assert f"m3i:{name}: no result after 30s; deleting it" in out
    # Read at t0, +10, +20, +30 (not over yet) and +40 (over): no poll past the deadline.
    assert len(custom.reads) == 5 and clock.sleeps == [10] * 4


def test_no_timeout_waits_as_long_as_it_takes():
    custom = FakeCustomObjects([volcano("Running")] * 500 + [volcano("Completed")])
    clock = FakeTime()
    result, _, _ = run("volcano", custom, clock=clock)
    assert result.state == "SUCCEEDED" and len(clock.sleeps) == 500


def test_job_already_gone_on_delete_is_fine():
    custom = FakeCustomObjects(RUN_OK["volcano"], delete_error=ApiException(status=404, reason="Not Found"))
    result, out, name = run("volcano", custom)
    assert result.ok and result.state == "SUCCEEDED"
    assert "delete failed" not in out


@pytest.mark.parametrize("error", [ApiException(status=403, reason="Forbidden"), ConnectionResetError("connection reset by peer")])
@pytest.mark.parametrize("statuses, state", [(RUN_OK["volcano"], "SUCCEEDED"), (RUN_FAILED["volcano"], "FAILED")])
def test_delete_error_is_reported_but_the_job_result_stays(error, statuses, state):
    custom = FakeCustomObjects(statuses, delete_error=error)
    result, out, name = run("volcano", custom)
    assert result.state == state and result.handle == f"m3i:{name}"
    (line,) = lines_of(out, f"m3i:{name}: delete failed: ")
    assert ("403" in line) if isinstance(error, ApiException) else ("connection reset by peer" in line)
    assert f"m3i:{name}: deleted" not in out


def test_a_broken_log_stream_does_not_fail_the_run():
    custom = FakeCustomObjects(RUN_OK["pytorchjob"])
    core = FakeCore(
        pods=[pod("p-0", "Running"), pod("p-1", "Running"), pod("p-2", "Running")],
        logs={
            "p-0": ApiException(status=500, reason="Internal Server Error"),
            "p-1": FakeStream([b"step 1\n", b"step 2\n"], error=ConnectionResetError("connection reset")),
            "p-2": "fine\n",
        },
    )
    result, out, _ = run("pytorchjob", custom, core)
    assert result.ok and result.state == "SUCCEEDED" and len(custom.deleted) == 1
    (p0,) = lines_of(out, "p-0 ")
    assert p0.startswith("p-0 [log stream ended: (500)")
    assert lines_of(out, "p-1 ") == ["p-1 step 1", "p-1 step 2", "p-1 [log stream ended: connection reset]"]
    assert lines_of(out, "p-2 ") == ["p-2 fine"]


def test_follow_logs_follows_at_most_max_pods_at_once():
    job = render(cluster_cfg("pytorchjob"), TRAIN_ARGS)
    gates = [threading.Event(), threading.Event()]

    class Blocking(FakeCore):
        def read_namespaced_pod_log(self, **kw):
            resp = super().read_namespaced_pod_log(**kw)
            gates[0 if len(self.log_reads) <= 3 else 1].wait(10)
            return resp

    core = Blocking(pods=[pod(f"p-{i:02d}", "Running") for i in range(12)], logs={f"p-{i:02d}": f"line {i}" for i in range(12)})
    cj = ClusterJob("pytorchjob", job, apis=(FakeCustomObjects([{}]), core))
    out = io.StringIO()
    cj.follow_logs(out, max_pods=3)
    cj.follow_logs(out, max_pods=3)  # three streams still open: nothing more
    assert sum(t.is_alive() for t in cj._threads) == 3
    gates[0].set()
    cj.join_logs()
    assert sorted(out.getvalue().splitlines()) == ["p-00 line 0", "p-01 line 1", "p-02 line 2"]
    cj.follow_logs(out, max_pods=3)  # those ended: the next three are followed
    gates[1].set()
    cj.join_logs()
    assert sorted(r["name"] for r in core.log_reads) == [f"p-{i:02d}" for i in range(6)]


# --- refusals ---------------------------------------------------------------------------------------


def test_unknown_kind_is_refused_naming_it():
    job = render(cluster_cfg("volcano"), TRAIN_ARGS)
    with pytest.raises(ValueError, match=r"'slurm'.*\['pytorchjob', 'trainjob', 'volcano'\]"):
        ClusterJob("slurm", job, apis=(FakeCustomObjects([{}]), FakeCore()))


def test_unknown_kind_creates_nothing(previous_handler):
    cfg = cluster_cfg("volcano")
    object.__setattr__(cfg, "kind", "slurm")  # LaunchConfig itself refuses it; a caller that bypasses it
    custom = FakeCustomObjects([{}])
    with pytest.raises(ValueError, match="'slurm'"):
        run_cluster_job(cfg, TRAIN_ARGS, log_to=io.StringIO(), apis=(custom, FakeCore()), sleep=lambda s: None, clock=lambda: 0.0)
    assert custom.created == []
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_local_scheduler_is_refused():
    custom = FakeCustomObjects([{}])
    with pytest.raises(ValueError, match="launch.scheduler='local_cwd'"):
        run_cluster_job(LaunchConfig(), TRAIN_ARGS, apis=(custom, FakeCore()), sleep=lambda s: None, clock=lambda: 0.0)
    assert custom.created == []


def test_failed_create_restores_the_sigterm_handler(previous_handler):
    """A refused create (RBAC, quota, admission) raises; the step's SIGTERM handling must be as before."""
    custom = FakeCustomObjects([{}], create_error=ApiException(status=403, reason="Forbidden"))
    with pytest.raises(ApiException):
        run("volcano", custom)
    assert custom.deleted == []
    assert signal.getsignal(signal.SIGTERM) is previous_handler


# --- stopping the step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_sigterm_during_the_wait_cancels_and_deletes(keep, previous_handler):
    """KFP or the kubelet stops the step: the job goes with it, even with keep."""
    assert threading.current_thread() is threading.main_thread()
    custom = FakeCustomObjects([volcano("Running")])
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result, out, name = run("volcano", custom, FakeCore(pods=[pod("p-0", "Running")]), sleep=sleep, keep=keep)
    assert (result.state, result.ok, result.handle) == ("CANCELLED", False, f"m3i:{name}")
    assert len(sleeps) == 2 and len(custom.reads) == 2
    assert f"m3i:{name}: step stopped (SIGTERM); deleting the job" in out
    assert len(custom.deleted) == 1 and f"m3i:{name}: deleted" in out
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_keyboard_interrupt_cancels_and_deletes(previous_handler):
    custom = FakeCustomObjects([volcano("Running")])

    def sleep(seconds: float) -> None:
        raise KeyboardInterrupt

    result, out, name = run("volcano", custom, sleep=sleep)
    assert result.state == "CANCELLED"
    assert f"m3i:{name}: step stopped (interrupt); deleting the job" in out
    assert len(custom.deleted) == 1
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_runs_off_the_main_thread_without_touching_signals(previous_handler):
    custom = FakeCustomObjects(RUN_OK["volcano"])
    results = []
    t = threading.Thread(target=lambda: results.append(run("volcano", custom)))
    t.start()
    t.join(timeout=30)
    ((result, _, _),) = results
    assert result.state == "SUCCEEDED" and len(custom.deleted) == 1
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_api_errors_while_polling_propagate_after_deleting_the_job():
    """A status read that fails is not a result: it is raised, and the job does not outlive the step."""

    class Broken(FakeCustomObjects):
        def get_namespaced_custom_object(self, **kw):
            raise ApiException(status=401, reason="Unauthorized")

    custom = Broken([{}])
    out = io.StringIO()
    with pytest.raises(ApiException):
        run_cluster_job(cluster_cfg(), TRAIN_ARGS, log_to=out, apis=(custom, FakeCore()), sleep=lambda s: None, clock=lambda: 0.0)
    assert len(custom.deleted) == 1 and ": deleted" in out.getvalue()


def test_transient_api_errors_while_polling_are_tolerated():
    """A 5xx or reset between two polls of a days-long job is retried, not fatal."""

    class Flaky(FakeCustomObjects):
        fails = 2

        def get_namespaced_custom_object(self, **kw):
            if Flaky.fails:
                Flaky.fails -= 1
                raise ApiException(status=503, reason="Service Unavailable")
            return super().get_namespaced_custom_object(**kw)

    custom = Flaky([volcano("Completed")])
    out = io.StringIO()
    result = run_cluster_job(cluster_cfg(), TRAIN_ARGS, log_to=out, apis=(custom, FakeCore()), sleep=lambda s: None, clock=lambda: 0.0)
    assert result.state == "SUCCEEDED" and len(custom.deleted) == 1
    assert out.getvalue().count("status read failed") == 2


# --- Kueue ---------------------------------------------------------------------------------------------


QUEUED = {
    "trainjob": [trainjob(SUSPENDED), trainjob(SUSPENDED), trainjob(RESUMED), trainjob(RESUMED, active=1),
                 trainjob(RESUMED, active=1, ready=1), trainjob(RESUMED, COMPLETE, succeeded=1)],
    "pytorchjob": [
        pytorchjob(CREATED, cond("Suspended", reason="PyTorchJobSuspended")),
        pytorchjob(CREATED, cond("Suspended", reason="PyTorchJobSuspended")),
        pytorchjob(CREATED, cond("Suspended", "False", reason="PyTorchJobResumed")),
        pytorchjob(CREATED, cond("Suspended", "False", reason="PyTorchJobResumed"), cond("Running")),
        pytorchjob(CREATED, cond("Suspended", "False", reason="PyTorchJobResumed"), cond("Running", "False"), cond("Succeeded")),
    ],
}


@pytest.mark.parametrize("kind", sorted(QUEUED))
def test_a_job_queued_by_kueue_waits_then_runs(kind):
    """launch.kueue: the job goes in labelled for its LocalQueue; while Kueue holds it suspended it is a
    wait (pods not even listed), then it runs, is followed and deleted as any other."""
    custom = FakeCustomObjects(QUEUED[kind])
    core = FakeCore(pods=[pod("p-0", "Running")], logs={"p-0": "step 1\n"})
    result, out, name = run(kind, custom, core, cfg=cluster_cfg(kind, kueue=True, queue="training"))
    assert custom.created[0]["body"]["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "training"
    assert result.ok and result.state == "SUCCEEDED" and len(custom.deleted) == 1
    states = lines_of(out, f"m3i:{name}: ")
    assert states[0].startswith(f"m3i:{name}: PENDING Suspended ")
    assert states[0].endswith(" (waiting for Kueue to admit it from LocalQueue training)")
    assert [s.split()[1] for s in states] == ["PENDING"] * (len(states) - 3) + ["RUNNING", "SUCCEEDED", "deleted"]
    assert len(core.listed) == 2  # from RUNNING on
    assert lines_of(out, "p-0 ") == ["p-0 step 1"]


# --- restarts (preemption) -----------------------------------------------------------------------------


def test_logs_of_pods_recreated_after_a_restart_are_followed():
    """Volcano and the Training Operator recreate a restarted job's pods under the same names.

    The new attempt's log is what explains how the job ends, so it must be streamed too.
    """
    custom = FakeCustomObjects([volcano("Running"), volcano("Restarting"), volcano("Running"), volcano("Completed")])
    attempts = [[pod("p-0", "Running", "uid-a")], [pod("p-0", "Pending", "uid-b")], [pod("p-0", "Running", "uid-b")]]
    core = FakeCore(pods=lambda: attempts[min(len(custom.reads), 3) - 1], logs={"p-0": "some lines\n"})
    result, _, _ = run("volcano", custom, core)
    assert result.state == "SUCCEEDED"
    assert [r["name"] for r in core.log_reads] == ["p-0", "p-0"]  # once per pod incarnation


# --- default APIs ------------------------------------------------------------------------------------------


def test_default_apis_come_from_the_kube_config(monkeypatch):
    from kubernetes import config

    calls = []

    def no_cluster():
        calls.append("incluster")
        raise config.ConfigException("not in a pod")

    monkeypatch.setattr(config, "load_incluster_config", no_cluster)
    monkeypatch.setattr(config, "load_kube_config", lambda: calls.append("kubeconfig"))
    cj = ClusterJob("volcano", render(cluster_cfg(), TRAIN_ARGS))
    assert calls == ["incluster", "kubeconfig"]
    assert isinstance(cj.custom, client.CustomObjectsApi) and isinstance(cj.core, client.CoreV1Api)
    assert cj.handle == f"m3i:{cj.name}"


def test_launch_cli_wait_follows_the_job(monkeypatch, capsys):
    """`m3i launch --scheduler kubernetes --wait` goes through run_cluster_job and exits with its result."""
    import m3i.launch.watch as watch
    from m3i.cli import main
    from m3i.launch import LaunchResult

    seen = {}

    def fake(cfg, train_args, **kw):
        seen.update(cfg=cfg, args=train_args, kw=kw)
        return LaunchResult("kubernetes", "FAILED", handle="m3i:j-1")

    monkeypatch.setattr(watch, "run_cluster_job", fake)
    code = main(["launch", "--scheduler", "kubernetes", "--kind", "pytorchjob", "--nodes", "2", "--wait", "--timeout", "60",
                 "--", "--preset", "demo"])
    assert code == 1 and "FAILED: m3i:j-1" in capsys.readouterr().out
    assert seen["cfg"].kind == "pytorchjob" and seen["cfg"].nodes == 2
    assert seen["args"] == ["--preset", "demo"] and seen["kw"] == {"timeout_s": 60.0}
    assert main(["launch", "--wait"]) == 2  # local_cwd already waits
    assert "--wait follows a Kubernetes job" in capsys.readouterr().err
