"""launch.kind=trainjob: the Kubeflow Trainer v2 TrainJob, the m3i runtime it references, and Kueue.

Every rendered object is checked against the upstream Trainer v2.3 CRDs (strict: unknown
fields fail). :func:`trainer_pod` models what the Trainer makes of a runtime plus a
TrainJob (its strategic merge of the runtime patch, the trainer overrides and the torch
plugin's ``PET_*`` env), so that the pod the cluster would run can be checked as a Pod.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from m3i.config.core import from_dict
from m3i.config.launch import KUEUE_QUEUE_LABEL, TORCHRUN_ENV, TRAINER_MASTER_PORT, LaunchConfig
from m3i.launch import launch, render, to_yaml
from m3i.launch.pod import POD_LABELS, resources
from m3i.launch.trainjob import NODE, PATCH_MANAGER, render_trainjob, render_training_runtime
from tests.k8s_schema import assert_valid, errors, validate_core
from tests.test_launch import FakeCustomObjectsApi, gpu_cfg

TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME_CRDS = {
    "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
    "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml",
}
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
TRAIN_ARGS = ["--preset", "default", "--set", "train.lr=1e-4"]
METRICS_SET = ["--set", "metrics.port=9400"]
GPU_TAIL = ["--set", "train.device=cuda", *METRICS_SET]  # what launch appends to a GPU job's m3i train
TORCHRUN = [
    "torchrun", "--nnodes=$(PET_NNODES)", "--nproc_per_node=$(PET_NPROC_PER_NODE)", "--node_rank=$(PET_NODE_RANK)",
    "--master_addr=$(PET_MASTER_ADDR)", "--master_port=$(PET_MASTER_PORT)",
]
# What TrainJob v2.3's PodSpecPatch and ContainerPatch may carry (pkg/apis/trainer/v1alpha1/trainjob_types.go).
PATCHABLE_POD = {"serviceAccountName", "volumes", "initContainers", "containers", "imagePullSecrets", "securityContext",
                 "nodeSelector", "affinity", "tolerations", "schedulingGates", "terminationGracePeriodSeconds"}
PATCHABLE_CONTAINER = {"name", "env", "volumeMounts", "securityContext"}


def trainjob_cfg(**kw) -> LaunchConfig:
    """A GPU node pool TrainJob, as a production config would set it."""
    return gpu_cfg(**{"kind": "trainjob", **kw})


# --- a model of what Kubeflow Trainer v2.3 makes of a runtime and a TrainJob ----------------

# Merge keys of the lists the Trainer merges strategically (JobSetSpec, PodSpec, Container).
_MERGE_KEYS = {"replicatedJobs": "name", "containers": "name", "initContainers": "name", "volumes": "name",
               "env": "name", "volumeMounts": "mountPath", "ports": "containerPort"}


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Kubernetes' strategic merge for the fields in play: maps merge, keyed lists merge by key, others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in _MERGE_KEYS:
        merge_key = _MERGE_KEYS[key]
        out = [copy.deepcopy(b) for b in base]
        for item in patch:
            found = [i for i, b in enumerate(out) if b.get(merge_key) == item.get(merge_key)]
            if found:
                out[found[0]] = strategic_merge(out[found[0]], item, None)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def trainer_pod(runtime: dict[str, Any], job: dict[str, Any], rank: int = 0) -> dict[str, Any]:
    """The Pod of node ``rank`` that Kubeflow Trainer v2.3 creates for ``job`` on ``runtime``.

    Follows pkg/runtime/core/trainingruntime.go (runtime patches by strategic merge,
    resourcesPerNode merged into the ``node`` container) and the torch plugin (trainer env
    upserted, then PET_* env and container port 29500). Not modelled: JobSet's own labels,
    hostname and subdomain.
    """
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert job["spec"]["runtimeRef"]["kind"] == runtime["kind"]
    jobset = copy.deepcopy(runtime["spec"]["template"]["spec"])
    for patch in job["spec"].get("runtimePatches", []):
        jobset = strategic_merge(jobset, patch["trainingRuntimeSpec"]["template"]["spec"])
    (rjob,) = [r for r in jobset["replicatedJobs"] if r["template"]["metadata"]["labels"].get(
        "trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"]
    pod = rjob["template"]["spec"]["template"]
    (c,) = [c for c in pod["spec"]["containers"] if c["name"] == NODE]
    trainer = job["spec"]["trainer"]
    c["image"] = trainer["image"]
    c["command"] = trainer["command"]
    c["resources"] = strategic_merge(c.get("resources", {}), trainer["resourcesPerNode"])
    c["env"] = strategic_merge(c.get("env", []), trainer["env"], "env")
    name = job["metadata"]["name"]
    c["env"] = strategic_merge(c["env"], [
        {"name": "PET_NNODES", "value": str(trainer["numNodes"])},
        {"name": "PET_NPROC_PER_NODE", "value": str(trainer["numProcPerNode"])},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_MASTER_PORT)},
    ], "env")
    c["ports"] = strategic_merge(c.get("ports", []), [{"containerPort": TRAINER_MASTER_PORT}], "ports")
    meta = pod.get("metadata", {})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-{NODE}-0-{rank}", **meta}, "spec": pod["spec"]}


def check_restricted_pod(pod: dict[str, Any]) -> None:
    """Pod Security "restricted" and m3i's own rules for a training pod."""
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in v for v in spec["volumes"])
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["runAsGroup"] > 0
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}


def referenced_vars(command: list[str]) -> set[str]:
    """``$(VAR)`` references Kubernetes expands in a command (``$$(`` is a literal)."""
    return set(re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(command)))


def patched_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The pod template of m3i's runtime patch (``spec`` and ``metadata``)."""
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == NODE
    return rjob["template"]["spec"]["template"]


# --- the TrainJob ---------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 2])
def test_trainjob_is_valid_and_runs_m3i_train_under_torchrun(nodes):
    cfg = trainjob_cfg(nodes=nodes)
    job = render(cfg, TRAIN_ARGS)
    assert_valid(job, TRAINJOB_CRD)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert re.fullmatch(r"m3i-train-[a-z0-9]+", job["metadata"]["name"]) and job["metadata"]["namespace"] == "m3i"
    assert KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "m3i-torch"}
    trainer = spec["trainer"]
    assert trainer["image"] == cfg.image
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, 8)
    assert trainer["command"] == [*TORCHRUN, "-m", "m3i", "train", *TRAIN_ARGS, *GPU_TAIL]
    assert referenced_vars(trainer["command"]) == set(TORCHRUN_ENV)  # exactly what the torch plugin injects
    # GPUs, Guaranteed QoS: the same requests and limits as every other kind.
    want = {"cpu": "90", "memory": "900Gi", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"] == {"requests": want, "limits": want} == resources(cfg)
    env = {e["name"]: e for e in trainer["env"]}
    assert len(env) == len(trainer["env"]), "env is a map keyed by name"
    assert not any(n.startswith(("TORCHX_", "PET_")) for n in env)  # PET_* are the Trainer's, refused here
    assert env["NCCL_DEBUG"]["value"] == "WARN" and "DS_ACCELERATOR" not in env
    assert env["HOME"]["value"] == "/tmp" and env["TORCH_EXTENSIONS_DIR"]["value"] == "/cache/torch_extensions"
    # The S3 credentials by reference, in the trainer's env (the Trainer refuses env in a node patch).
    for key in SECRET_KEYS:
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"] == "m3i-s3"
        assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER and re.fullmatch(r"[a-z0-9.-]+/[a-z0-9-]+", PATCH_MANAGER)


def test_the_pod_policy_rides_in_the_runtime_patch():
    cfg = trainjob_cfg()
    job = render_trainjob(cfg, TRAIN_ARGS, job_name="m3i-train-x1")
    tpl = patched_pod(job)
    assert POD_LABELS.items() <= tpl["metadata"]["labels"].items()
    assert tpl["metadata"]["labels"]["app.kubernetes.io/instance"] == "m3i-train-x1"
    spec = tpl["spec"]
    assert set(spec) <= PATCHABLE_POD
    assert spec["nodeSelector"] == cfg.node_selector and spec["serviceAccountName"] == "m3i-trainer"
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"},
    ]
    vols = {v["name"]: v for v in spec["volumes"]}
    (c,) = spec["containers"]
    assert c["name"] == NODE and set(c) <= PATCHABLE_CONTAINER and "env" not in c
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert vols[shm["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/tmp", "/cache"}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert spec["terminationGracePeriodSeconds"] == 300  # room for a final save, not Kubernetes' 30 s


def test_grace_period_nccl_and_rdma_reach_the_trainer_pod():
    """launch.termination_grace_seconds, nccl_env and an RDMA device: in the job (patch and trainer), not the runtime."""
    cfg = trainjob_cfg(termination_grace_seconds=900, nccl_env={"NCCL_IB_HCA": "mlx5"}, rdma_resource="rdma/ib")
    job = render_trainjob(cfg, TRAIN_ARGS, job_name="m3i-train-rdma")
    assert_valid(job, TRAINJOB_CRD)
    own = render_training_runtime(cfg)
    assert_valid(own, RUNTIME_CRDS["TrainingRuntime"])
    check_restricted_pod(own["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"])  # no IPC_LOCK
    runtime = render_training_runtime(trainjob_cfg())  # a runtime of defaults: the job brings its own values
    pod = trainer_pod(runtime, job)
    validate_core(pod)
    (c,) = pod["spec"]["containers"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 900
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["M3I_TERMINATION_GRACE_SECONDS"] == "900" and env["NCCL_IB_HCA"] == "mlx5"
    assert c["resources"]["limits"]["rdma/ib"] == "1" == c["resources"]["requests"]["rdma/ib"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}


def test_cpu_job_and_writable_root():
    cfg = trainjob_cfg(nodes=1, nproc_per_node=2, gpus_per_node=0, cpu=3.5, memory="16Gi", shm_size="4Gi",
                       node_selector={}, tolerations=(), s3_secret=None, service_account=None,
                       read_only_root_filesystem=False)
    job = render_trainjob(cfg, [], job_name="cpu-job")
    assert_valid(job, TRAINJOB_CRD)
    trainer = job["spec"]["trainer"]
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "3500m", "memory": "16Gi"}
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1" and not SECRET_KEYS & set(env)
    spec = patched_pod(job)["spec"]
    assert not {"nodeSelector", "tolerations", "serviceAccountName"} & set(spec)
    (c,) = spec["containers"]
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/dev/shm"] and c["securityContext"]["readOnlyRootFilesystem"] is False


def test_escapes_kubernetes_variable_references():
    job = render_trainjob(trainjob_cfg(), ["--set", "train.out=$(HOME)/x"], job_name="fixed")
    assert job["metadata"]["name"] == "fixed"
    assert job["spec"]["trainer"]["command"][-5:] == ["train.out=$$(HOME)/x", *GPU_TAIL]
    assert referenced_vars(job["spec"]["trainer"]["command"]) == set(TORCHRUN_ENV)


def test_no_credential_value_is_rendered(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-SENTINEL-ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret-value")
    cfg = trainjob_cfg()
    for obj in (render(cfg, TRAIN_ARGS), render_training_runtime(cfg), render_training_runtime(cfg, cluster=True)):
        text = to_yaml(obj)
        assert "SENTINEL" not in text and "sentinel" not in text


def test_strict_schema_rejects_what_a_patch_cannot_carry():
    """Why automountServiceAccountToken, enableServiceLinks, the PriorityClass and ports live in the runtime."""
    job = render_trainjob(trainjob_cfg(), [], job_name="x")
    spec = patched_pod(job)["spec"]
    spec.update(automountServiceAccountToken=False, enableServiceLinks=False, priorityClassName="m3i-train")
    spec["containers"][0]["ports"] = [{"name": "metrics", "containerPort": 9400}]
    job["spec"]["trainer"]["numProcsPerNode"] = 8
    found = " ".join(errors(job, TRAINJOB_CRD))
    for field in ("automountServiceAccountToken", "enableServiceLinks", "priorityClassName", "'ports'", "numProcsPerNode"):
        assert field in found, field


# --- the runtime, and the pod the Trainer makes of the pair -----------------------------------


@pytest.mark.parametrize("cluster", [False, True])
def test_runtime_is_valid_and_restricted(cluster):
    cfg = trainjob_cfg()
    rt = render_training_runtime(cfg, cluster=cluster)
    assert_valid(rt, RUNTIME_CRDS[rt["kind"]])
    assert rt["kind"] == ("ClusterTrainingRuntime" if cluster else "TrainingRuntime")
    assert ("namespace" in rt["metadata"]) is not cluster and rt["metadata"]["name"] == "m3i-torch"
    assert rt["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    spec = rt["spec"]
    assert spec["mlPolicy"] == {"numNodes": 1, "torch": {}}
    assert spec["template"]["spec"]["failurePolicy"] == {"maxRestarts": 5}
    (rjob,) = spec["template"]["spec"]["replicatedJobs"]
    # Upstream's torch runtime: replicated job and container "node", the trainer ancestor label.
    assert rjob["name"] == NODE and rjob["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert rjob["template"]["spec"]["backoffLimit"] == 0
    pod = rjob["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == POD_LABELS
    pspec = pod["spec"]
    (c,) = pspec["containers"]
    assert c["name"] == NODE and c["image"] == cfg.image and c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == [*TORCHRUN, "-m", "m3i", "train", *METRICS_SET]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [
        ("metrics", 9400), *((f"metrics-{r}", 9400 + r) for r in range(1, 8))]
    # Only job-independent parts: sizes, placement and job env come from each TrainJob.
    assert "resources" not in c and not any("valueFrom" in e for e in c["env"])
    assert not {"nodeSelector", "tolerations"} & set(pspec)
    assert {v["name"]: v["emptyDir"] for v in pspec["volumes"]}["dshm"] == {"medium": "Memory"}
    assert pspec["priorityClassName"] == "m3i-train" and pspec["restartPolicy"] == "Never"
    assert pspec.get("serviceAccountName") == (None if cluster else "m3i-trainer")
    check_restricted_pod({"spec": pspec})
    assert render_training_runtime(dataclass_replace(cfg, runtime_kind=rt["kind"])) == rt  # cluster=None follows the config


def dataclass_replace(cfg: LaunchConfig, **kw) -> LaunchConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("runtime_kind", ["TrainingRuntime", "ClusterTrainingRuntime"])
@pytest.mark.parametrize("gpus", [8, 0])
def test_the_trainer_pod_is_the_m3i_training_pod(runtime_kind, gpus):
    """Runtime (rendered from one config) + TrainJob (from another): the pod carries the job's policy."""
    cfg = trainjob_cfg(runtime_kind=runtime_kind, gpus_per_node=gpus, nproc_per_node=8 if gpus else 2)
    runtime = render_training_runtime(trainjob_cfg(runtime_kind=runtime_kind, max_retries=3, priority_class=None))
    job = render_trainjob(cfg, TRAIN_ARGS, job_name="m3i-train-abc")
    pod = trainer_pod(runtime, job, rank=1)
    validate_core(pod)  # a valid Pod, unknown fields rejected
    check_restricted_pod(pod)
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert POD_LABELS.items() <= pod["metadata"]["labels"].items()
    assert spec["nodeSelector"] == cfg.node_selector and len(spec["tolerations"]) == 2
    assert spec["serviceAccountName"] == "m3i-trainer"
    assert c["resources"] == resources(cfg)  # no GPU left over from a runtime default
    env = {e["name"]: e for e in c["env"]}
    assert referenced_vars(c["command"]) <= set(env)
    assert ("DS_ACCELERATOR" in env) == (gpus == 0) and ("NCCL_DEBUG" in env) == bool(gpus)
    assert {k for k in env if "secretKeyRef" in env[k].get("valueFrom", {})} == SECRET_KEYS
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/tmp", "/cache"}
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == 9400 and ports["metrics-7"] == 9407 and TRAINER_MASTER_PORT in ports.values()
    assert env["PET_MASTER_ADDR"]["value"] == "m3i-train-abc-node-0-0.m3i-train-abc"


def test_runtime_metrics_ports_stay_clear_of_the_trainer_port():
    with pytest.raises(ValueError, match="launch.metrics_port=29495: the runtime's 8 metrics ports 29495..29502"):
        render_training_runtime(trainjob_cfg(kind="volcano", rdzv_port=29600, metrics_port=29495))
    assert len(render_training_runtime(trainjob_cfg(nproc_per_node=8))["spec"]["template"]["spec"]["replicatedJobs"][0]
               ["template"]["spec"]["template"]["spec"]["containers"][0]["ports"]) == 8


# --- m3i launch -----------------------------------------------------------------------------


def test_cli_dryrun_prints_a_valid_trainjob(capsys):
    from m3i.cli import main

    argv = ["launch", "--scheduler", "kubernetes", "--kind", "trainjob", "--nodes", "2", "--dryrun", "--", "--preset", "demo"]
    assert main(argv) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert_valid(job, TRAINJOB_CRD)
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 1
    assert trainer["command"][-7:] == ["train", "--preset", "demo", "--set", "train.device=cpu", *METRICS_SET]
    assert job["spec"]["runtimeRef"]["name"] == "m3i-torch"


def test_submit_trainjob_creates_the_rendered_job(monkeypatch):
    from kubernetes import client, config

    monkeypatch.setattr(config, "load_incluster_config", lambda: (_ for _ in ()).throw(config.ConfigException("not in a pod")))
    monkeypatch.setattr(config, "load_kube_config", lambda: None)
    monkeypatch.setattr(client, "CustomObjectsApi", FakeCustomObjectsApi)
    result = launch(trainjob_cfg(kueue=True), TRAIN_ARGS)
    (call,) = FakeCustomObjectsApi.last.created
    assert (call["group"], call["version"], call["plural"], call["namespace"]) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "m3i")
    assert result.state == "SUBMITTED" and result.handle == f"m3i:{call['body']['metadata']['name']}"
    assert_valid(call["body"], TRAINJOB_CRD)
    assert call["body"]["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "training"
    dry = launch(trainjob_cfg(), TRAIN_ARGS, dryrun=True)
    assert dry.state == "DRYRUN" and yaml.safe_load(dry.rendered)["kind"] == "TrainJob"


# --- Kueue ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, crd", [("trainjob", TRAINJOB_CRD), ("volcano", "batch.volcano.sh_jobs.yaml"), ("pytorchjob", "kubeflow.org_pytorchjobs.yaml")]
)
def test_kueue_labels_the_job_with_its_queue(kind, crd):
    """Kueue finds a TrainJob or a PyTorchJob (built-in integrations) by the label on the job's own metadata."""
    on = render(trainjob_cfg(kind=kind, kueue=True, queue="gpu-queue"), TRAIN_ARGS)
    off = render(trainjob_cfg(kind=kind), TRAIN_ARGS)
    assert_valid(on, crd)
    assert on["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert KUEUE_QUEUE_LABEL not in off["metadata"].get("labels", {})
    assert LaunchConfig(kueue=True, queue="q").queue_labels() == {KUEUE_QUEUE_LABEL: "q"}


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"kind": "trainjobs"}, "launch.kind='trainjobs' is not allowed; choose one of ['volcano', 'pytorchjob', 'trainjob']"),
        ({"runtime": "M3I_Torch"}, "launch.runtime='M3I_Torch' is not a Kubernetes name"),
        ({"runtime": ""}, "launch.runtime='' is not a Kubernetes name"),
        ({"runtime_kind": "Runtime"},
         "launch.runtime_kind='Runtime' is not allowed; choose one of ['TrainingRuntime', 'ClusterTrainingRuntime']"),
        ({"runtime_kind": "trainingruntime"}, "launch.runtime_kind='trainingruntime' is not allowed"),
        ({"kind": "trainjob", "rdzv_port": 29600}, "launch.rdzv_port=29600 cannot apply with launch.kind='trainjob'"),
        ({"kind": "trainjob", "name": "3d-train"}, "launch.name='3d-train' must start with a letter with launch.kind='trainjob'"),
        ({"kind": "trainjob", "env": ["PET_NNODES=4"]}, "launch.env sets ['PET_NNODES'], which Kubeflow Trainer injects"),
        ({"kueue": True, "queue": "q." + "x" * 70}, "must be a label value (at most 63 characters) with launch.kueue=true"),
        ({"kueue": "sometimes"}, "launch.kueue='sometimes' is not a boolean"),
    ],
)
def test_bad_values_name_field_and_value(values, needle):
    with pytest.raises(ValueError) as e:
        from_dict(LaunchConfig, values, section="launch")
    assert needle in str(e.value)


def test_bad_job_name_is_refused():
    with pytest.raises(ValueError, match=r"TrainJob name 'Train_1' must be an RFC 1035 label"):
        render_trainjob(trainjob_cfg(), [], job_name="Train_1")


def test_config_from_set_strings():
    cfg = from_dict(LaunchConfig, {"kind": "trainjob", "runtime": "team.m3i-torch", "runtime_kind": "ClusterTrainingRuntime",
                                   "kueue": "true"}, section="launch")
    assert (cfg.runtime, cfg.runtime_kind, cfg.kueue) == ("team.m3i-torch", "ClusterTrainingRuntime", True)
    job = render_trainjob(dataclass_replace(cfg, scheduler="kubernetes"), [], job_name="j")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "team.m3i-torch"}
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "default"
