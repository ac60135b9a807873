"""m3i launch: the torchx AppDef, the Volcano Job and PyTorchJob it renders, a real local run."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml

from m3i.config.core import from_dict
from m3i.config.launch import KUEUE_QUEUE_LABEL, LaunchConfig
from m3i.launch import build_appdef, launch, render, to_yaml
from m3i.launch.cli import add_launch_parser, cmd_launch
from tests.k8s_schema import assert_valid, errors, validate_core

VOLCANO_CRD = "batch.volcano.sh_jobs.yaml"
PYTORCHJOB_CRD = "kubeflow.org_pytorchjobs.yaml"
IMAGE = "ghcr.io/m3i-project/m3i-train:0.1.0"
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
TRAIN_ARGS = ["--preset", "default", "--set", "train.lr=1e-4"]
METRICS_SET = ["--set", "metrics.port=9400"]  # appended by launch so served and exposed ports agree
# appended by launch before it: the device follows the pod's GPUs (a rank that cannot use them stops)
GPU_TAIL = ["--set", "train.device=cuda", *METRICS_SET]
CPU_TAIL = ["--set", "train.device=cpu", *METRICS_SET]


def gpu_cfg(**kw) -> LaunchConfig:
    """A GPU node pool job: what a production preset would set."""
    base = dict(
        scheduler="kubernetes",
        nodes=2,
        nproc_per_node=8,
        gpus_per_node=8,
        cpu=90,
        memory="900Gi",
        shm_size="64Gi",
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        tolerations=("nvidia.com/gpu:NoSchedule", "pool=gpu:NoExecute"),
        s3_secret="m3i-s3",
        namespace="m3i",
        queue="training",
        priority_class="m3i-train",
        service_account="m3i-trainer",
        max_retries=5,
    )
    base.update(kw)
    return LaunchConfig(**base)


def pods(obj: dict) -> list[dict]:
    """Pod templates of a Volcano Job or PyTorchJob."""
    if obj["kind"] == "Job":
        return [t["template"] for t in obj["spec"]["tasks"]]
    return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]


def check_pod(tpl: dict, cfg: LaunchConfig) -> None:
    """The pod policy every Kubernetes target shares."""
    spec = tpl["spec"]
    (c,) = spec["containers"]
    assert c["image"] == cfg.image
    assert spec["nodeSelector"] == cfg.node_selector
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"} in spec["tolerations"]
    assert spec["serviceAccountName"] == cfg.service_account and spec["priorityClassName"] == cfg.priority_class
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    # /dev/shm: one memory-backed emptyDir of the configured size.
    vols = {v["name"]: v for v in spec["volumes"]}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert vols[shm["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": cfg.shm_size}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/tmp", "/cache"}
    # S3 credentials only by reference: secret name and key, no value.
    env = {e["name"]: e for e in c["env"]}
    for key in SECRET_KEYS:
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == cfg.s3_secret
        assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    assert "DS_ACCELERATOR" not in env  # GPUs: DeepSpeed picks CUDA
    assert "CUDA_VISIBLE_DEVICES" not in env and "NVIDIA_VISIBLE_DEVICES" not in env  # the device plugin's to set
    # Time for the SIGTERM save, as the pod's grace period and as the trainer reads it.
    assert spec["terminationGracePeriodSeconds"] == cfg.termination_grace_seconds
    assert env["M3I_TERMINATION_GRACE_SECONDS"]["value"] == str(cfg.termination_grace_seconds)
    # Guaranteed QoS with GPUs.
    want = {"cpu": "90", "memory": cfg.memory, "nvidia.com/gpu": str(cfg.gpus_per_node)}
    assert c["resources"] == {"requests": want, "limits": want}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    last = cfg.nproc_per_node - 1  # one endpoint per local rank
    assert [ports["metrics"], ports["metrics-1"], ports[f"metrics-{last}"]] == [9400, 9401, 9400 + last]
    # Non-root, no privilege, no capabilities, default seccomp, read-only image.
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert tpl["metadata"]["labels"]["app.kubernetes.io/component"] == "train"
    # The pod template is a valid core Pod too (kubernetes-validate, unknown fields rejected).
    validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **tpl["metadata"]}, "spec": spec})


# --- AppDef -------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes, nproc, gpus", [(1, 2, 0), (4, 8, 8)])
def test_appdef_runs_m3i_train_under_torchrun(nodes, nproc, gpus):
    cfg = LaunchConfig(scheduler="kubernetes", nodes=nodes, nproc_per_node=nproc, gpus_per_node=gpus, cpu=16, memory="64Gi",
                       node_selector={"pool": "train"}, max_retries=2, env=("NCCL_SOCKET_IFNAME=eth0",))
    app = build_appdef(cfg, TRAIN_ARGS)
    (role,) = app.roles
    assert app.name == "m3i-train" and role.image == IMAGE and role.name == "m3i"
    assert role.num_replicas == nodes and role.min_replicas == nodes and role.max_retries == 2
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    cmd = role.args[1]
    assert cmd.startswith("torchrun ") and f"--nnodes {nodes} --nproc_per_node {nproc}" in cmd
    device = "cuda" if gpus else "cpu"
    assert cmd.endswith(f"-m m3i train --preset default --set train.lr=1e-4 --set train.device={device} --set metrics.port=9400")
    assert ("localhost:0" in cmd) == (nodes == 1)  # multi-node: c10d store on the first pod
    assert role.resource.cpu == 16 and role.resource.gpu == gpus and role.resource.memMB == 64 * 1024
    assert role.resource.capabilities == {"pool": "train"}
    assert role.port_map == {"c10d": 29500, **{("metrics" if r == 0 else f"metrics-{r}"): 9400 + r for r in range(nproc)}}
    assert role.env["NCCL_SOCKET_IFNAME"] == "eth0" and role.env["OMP_NUM_THREADS"] == str(16 // nproc)
    assert ("DS_ACCELERATOR" in role.env) == (gpus == 0)
    assert role.env["TORCH_EXTENSIONS_DIR"] == "/cache/torch_extensions"


# --- Volcano Job (torchx kubernetes scheduler) ---------------------------------------------


def test_volcano_job_is_valid_and_carries_the_pod_policy():
    cfg = gpu_cfg()
    job = render(cfg, TRAIN_ARGS)
    assert_valid(job, VOLCANO_CRD)
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert re.fullmatch(r"m3i-train-[a-z0-9]+", job["metadata"]["name"]) and job["metadata"]["namespace"] == "m3i"
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "training"
    assert spec["maxRetry"] == 5 and spec["minAvailable"] == 2 and spec["priorityClassName"] == "m3i-train"
    assert [t["name"] for t in spec["tasks"]] == ["m3i-0", "m3i-1"]
    for task in spec["tasks"]:
        assert task["replicas"] == 1 and task["maxRetry"] == 5
        assert {"event": "PodEvicted", "action": "RestartJob"} in task["policies"]
        check_pod(task["template"], cfg)
        cmd = task["template"]["spec"]["containers"][0]["command"]
        assert cmd[:2] == ["bash", "-c"]
        assert cmd[2].endswith("-m m3i train --preset default --set train.lr=1e-4 --set train.device=cuda --set metrics.port=9400")
        assert task["template"]["spec"]["restartPolicy"] == "Never"
    # the second pod finds the first through Volcano's svc plugin
    assert "${VC_M3I_0_HOSTS:=localhost}:29500" in spec["tasks"][1]["template"]["spec"]["containers"][0]["command"][2]
    assert "svc" in spec["plugins"]


def test_volcano_job_matches_the_torchx_cli_dry_run():
    """Our AppDef is stock dist.ddp: `torchx run --dryrun -s kubernetes` renders the same commands."""
    cfg = gpu_cfg(nodes=2, nproc_per_node=2, gpus_per_node=2)
    # torchx's CLI refuses a repeated --set, which m3i train's command ends with: another module has none.
    ours = render(cfg, ["--preset", "default"], module="m3i_other")
    cli = [
        *(sys.executable, "-m", "torchx.cli.main", "run", "--dryrun", "-s", "kubernetes", "-cfg", "queue=training,namespace=m3i"),
        *("--workspace", "", "dist.ddp", "-j", "2x2", "-m", "m3i_other", "--image", IMAGE, "--name", "m3i-train", "--gpu", "2"),
        *("train", "--preset", "default"),
    ]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout
    theirs = yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])

    def commands(job: dict) -> list[str]:
        name = job["metadata"]["name"]
        return [t["template"]["spec"]["containers"][0]["command"][2].replace(name, "ID") for t in job["spec"]["tasks"]]

    assert commands(ours) == commands(theirs)


def test_cpu_job_and_writable_root():
    cfg = LaunchConfig(scheduler="kubernetes", read_only_root_filesystem=False, s3_secret=None, cpu=3.5)
    job = render(cfg, [])
    assert_valid(job, VOLCANO_CRD)
    (task,) = job["spec"]["tasks"]
    (c,) = task["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DS_ACCELERATOR"] == "cpu" and not SECRET_KEYS & set(env)
    assert c["resources"]["limits"] == {"cpu": "3500m", "memory": "16Gi"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is False
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/dev/shm"]
    assert "nodeSelector" not in task["template"]["spec"] and "tolerations" not in task["template"]["spec"]


# --- PyTorchJob ---------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 4])
def test_pytorchjob_is_valid_and_carries_the_pod_policy(nodes):
    cfg = gpu_cfg(kind="pytorchjob", nodes=nodes)
    job = render(cfg, TRAIN_ARGS)
    assert_valid(job, PYTORCHJOB_CRD)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob" and job["metadata"]["namespace"] == "m3i"
    spec = job["spec"]
    assert spec["runPolicy"]["backoffLimit"] == 5 and "elasticPolicy" not in spec and spec["nprocPerNode"] == "8"
    replicas = {k: v["replicas"] for k, v in spec["pytorchReplicaSpecs"].items()}
    assert replicas == ({"Master": 1} if nodes == 1 else {"Master": 1, "Worker": nodes - 1})
    for tpl in pods(job):
        check_pod(tpl, cfg)
        (c,) = tpl["spec"]["containers"]
        assert c["name"] == "pytorch"
        assert {"name": "pytorchjob-port", "containerPort": 29500, "protocol": "TCP"} in c["ports"]
        assert c["command"] == [
            "torchrun", f"--nnodes={nodes}", "--nproc_per_node=8", "--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)",
            "--master_port=$(MASTER_PORT)", "-m", "m3i", "train", *TRAIN_ARGS, *GPU_TAIL,
        ]
        assert not any(e["name"].startswith("TORCHX_") for e in c["env"])
    assert "&id" not in to_yaml(job)  # no YAML anchors between the replica specs


def test_pytorchjob_escapes_kubernetes_variable_references():
    job = render(gpu_cfg(kind="pytorchjob"), ["--set", "train.out=$(HOME)/x"], job_name="fixed")
    assert job["metadata"]["name"] == "fixed"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"][-5:] == [
        "train.out=$$(HOME)/x", *GPU_TAIL]


def test_pytorchjob_with_kueue_carries_the_queue_label_on_the_job_only():
    """Kueue's kubeflow.org/pytorchjob integration reads the label off the PyTorchJob and suspends the job
    itself (runPolicy.suspend, by its webhook) until it admits it; nothing else of the job changes."""
    on = render(gpu_cfg(kind="pytorchjob", kueue=True), TRAIN_ARGS, job_name="j")
    off = render(gpu_cfg(kind="pytorchjob"), TRAIN_ARGS, job_name="j")
    assert_valid(on, PYTORCHJOB_CRD)
    assert on["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "training"
    for tpl in pods(on):
        assert KUEUE_QUEUE_LABEL not in tpl["metadata"]["labels"]  # the pods are the job's, not queued on their own
    del on["metadata"]["labels"][KUEUE_QUEUE_LABEL]
    assert on == off


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob"])
def test_no_credential_value_is_rendered(kind, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-SENTINEL-ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret-value")
    text = to_yaml(render(gpu_cfg(kind=kind), TRAIN_ARGS))
    assert "SENTINEL" not in text and "sentinel" not in text


# --- submission, against a fake API server ------------------------------------------------------


class FakeCustomObjectsApi:
    """Records what would be created; the kubernetes client's CustomObjectsApi call shape."""

    def __init__(self, *_, **__):
        self.created: list[dict] = []
        FakeCustomObjectsApi.last = self

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append({"group": group, "version": version, "namespace": namespace, "plural": plural, "body": body})
        return {"metadata": {"name": body["metadata"]["name"]}}


def test_submit_volcano_sends_the_patched_job(monkeypatch):
    """The torchx runner schedules our patched request, not torchx's own pods."""
    from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler

    api = FakeCustomObjectsApi()
    monkeypatch.setattr(KubernetesScheduler, "_custom_objects_api", lambda self: api)
    result = launch(gpu_cfg(), TRAIN_ARGS)
    (call,) = api.created
    assert (call["group"], call["version"], call["plural"], call["namespace"]) == ("batch.volcano.sh", "v1alpha1", "jobs", "m3i")
    assert result.state == "SUBMITTED" and result.handle == f"kubernetes://torchx/m3i:{call['body']['metadata']['name']}"
    assert_valid(call["body"], VOLCANO_CRD)
    assert call["body"]["spec"]["tasks"][0]["template"]["spec"]["tolerations"]


def test_submit_pytorchjob_creates_the_rendered_job(monkeypatch):
    from kubernetes import client, config

    monkeypatch.setattr(config, "load_incluster_config", lambda: (_ for _ in ()).throw(config.ConfigException("not in a pod")))
    monkeypatch.setattr(config, "load_kube_config", lambda: None)
    monkeypatch.setattr(client, "CustomObjectsApi", FakeCustomObjectsApi)
    result = launch(gpu_cfg(kind="pytorchjob"), TRAIN_ARGS)
    (call,) = FakeCustomObjectsApi.last.created
    assert (call["group"], call["version"], call["plural"], call["namespace"]) == ("kubeflow.org", "v1", "pytorchjobs", "m3i")
    assert result.state == "SUBMITTED" and result.handle == f"m3i:{call['body']['metadata']['name']}"
    assert_valid(call["body"], PYTORCHJOB_CRD)


# --- the schema helper itself ---------------------------------------------------------------


def test_strict_schema_catches_misspelled_fields():
    job = render(gpu_cfg(kind="pytorchjob", nodes=1), [])
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["tolerationz"] = []
    job["spec"]["runPolicy"]["backofLimit"] = 3
    found = errors(job, PYTORCHJOB_CRD)
    assert any("tolerationz" in e for e in found) and any("backofLimit" in e for e in found)
    assert errors(job, PYTORCHJOB_CRD, strict=False) == []  # plain jsonschema lets both through
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    assert any("'three' is not of type 'integer'" in e for e in errors(job, PYTORCHJOB_CRD, strict=False))
    with pytest.raises(ValueError, match="does not match CRD"):
        errors(job, VOLCANO_CRD)


# --- local_cwd: a real 2-process run ----------------------------------------------------------

PROBE = """
import json, os, sys
if "--fail" in sys.argv:
    raise RuntimeError(f"probe rank {os.environ['RANK']} was told to fail")
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "OMP_NUM_THREADS",
        "AWS_ACCESS_KEY_ID", "M3I_PROBE", "CUDA_VISIBLE_DEVICES", "M3I_TERMINATION_GRACE_SECONDS")
rec = {k: os.environ.get(k) for k in keys}
rec.update(argv=sys.argv[1:], sum=t.item(), cwd=os.getcwd())
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, f"rank-{rec['RANK']}.json"), "w") as f:
    json.dump(rec, f)
print(f"probe rank {rec['RANK']} ok", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_local_cwd_runs_two_ranks(tmp_path, monkeypatch):
    (tmp_path / "m3i_launch_probe.py").write_text(textwrap.dedent(PROBE))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(tmp_path)  # local_cwd runs in the current folder: `python -m` finds the probe
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "inherited-from-the-shell")
    cfg = from_dict(LaunchConfig, {"nproc_per_node": 2, "cpu": 2, "env": ["M3I_PROBE=yes"]}, section="launch")

    dry = launch(cfg, ["--out", str(out)], dryrun=True, module="m3i_launch_probe")
    assert dry.state == "DRYRUN" and "nproc_per_node" in dry.rendered and "m3i_launch_probe" in dry.rendered

    log = io.StringIO()
    result = launch(cfg, ["--out", str(out)], module="m3i_launch_probe", wait_interval=0.2, log=log)
    assert (result.state, result.exit_code) == ("SUCCEEDED", 0), log.getvalue()
    assert "probe rank 0 ok" in log.getvalue() and "probe rank 1 ok" in log.getvalue()  # output streamed back
    recs = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, rec in enumerate(recs):
        assert rec["RANK"] == str(r) and rec["LOCAL_RANK"] == str(r) and rec["WORLD_SIZE"] == "2"
        assert rec["MASTER_ADDR"] and rec["MASTER_PORT"]
        assert rec["sum"] == 3.0  # gloo all_reduce across both ranks
        assert rec["argv"] == ["train", "--out", str(out)]
        assert rec["DS_ACCELERATOR"] == "cpu" and rec["OMP_NUM_THREADS"] == "1"
        assert rec["CUDA_VISIBLE_DEVICES"] == "" and rec["M3I_TERMINATION_GRACE_SECONDS"] == "300"  # no GPU asked: none seen
        assert rec["AWS_ACCESS_KEY_ID"] == "inherited-from-the-shell" and rec["M3I_PROBE"] == "yes"
        assert os.path.samefile(rec["cwd"], tmp_path)

    log = io.StringIO()
    failed = launch(cfg, ["--out", str(out), "--fail"], module="m3i_launch_probe", wait_interval=0.2, log=log)
    assert (failed.state, failed.exit_code) == ("FAILED", 1)
    # after torchrun's report, the rank's own error, once per replica
    tail = log.getvalue().splitlines()[-1]
    assert re.fullmatch(r"m3i launch: m3i_launch_probe/0 failed with: .*RuntimeError: probe rank [01] was told to fail", tail), log.getvalue()[-2000:]


# --- ranks per GPU, devices, grace period, NCCL and RDMA ------------------------------------------


@pytest.mark.parametrize("nproc, gpus, ranks", [(0, 0, 1), (0, 8, 8), (0, 1, 1), (2, 8, 2), (3, 0, 3)])
def test_ranks_default_to_one_per_gpu(nproc, gpus, ranks):
    cfg = LaunchConfig(nproc_per_node=nproc, gpus_per_node=gpus)
    assert cfg.ranks_per_node == ranks
    assert len(build_appdef(cfg, []).roles[0].port_map) == 1 + ranks  # c10d + one metrics port per rank


def _dryrun(argv: list[str], capsys) -> dict:
    from m3i.cli import main

    assert main(["launch", *argv, "--dryrun", "--", "--preset", "default"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob", "trainjob"])
@pytest.mark.parametrize("how", [["--set", "launch.gpus_per_node=8"], ["--gpus-per-node", "8"]])
def test_gpus_per_node_fills_every_gpu_of_every_kind(kind, how, capsys):
    """README's GPU line: 8 GPUs per pod run 8 ranks per pod, each told to train on CUDA."""
    # A GPU pool's pod size, so that the /dev/shm check (tests/test_shm.py) does not depend on the preset's loader.
    pool = ["--set", "launch.memory=900Gi", "--set", "launch.shm_size=64Gi"]
    job = _dryrun(["--set", "launch.scheduler=kubernetes", "--set", f"launch.kind={kind}", *how, *pool], capsys)
    if kind == "volcano":
        assert_valid(job, VOLCANO_CRD)
        (task,) = job["spec"]["tasks"]
        (c,) = task["template"]["spec"]["containers"]
        assert "--nnodes 1 --nproc_per_node 8 " in c["command"][2]
        assert c["command"][2].endswith(" ".join(GPU_TAIL))
    elif kind == "pytorchjob":
        assert_valid(job, PYTORCHJOB_CRD)
        (c,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        assert job["spec"]["nprocPerNode"] == "8" and "--nproc_per_node=8" in c["command"]
        assert c["command"][-4:] == GPU_TAIL
    else:
        from tests.test_trainjob import TRAINJOB_CRD

        assert_valid(job, TRAINJOB_CRD)
        trainer = job["spec"]["trainer"]
        assert trainer["numProcPerNode"] == 8 and trainer["command"][-4:] == GPU_TAIL
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
        return
    ports = [p["name"] for p in c["ports"] if p["name"].startswith("metrics")]
    assert ports == ["metrics", *(f"metrics-{r}" for r in range(1, 8))]  # one endpoint per rank
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_an_explicit_process_count_wins_over_the_gpus(capsys):
    job = _dryrun(["--scheduler", "kubernetes", "--kind", "pytorchjob", "--gpus-per-node", "8", "--nproc-per-node", "2"], capsys)
    assert job["spec"]["nprocPerNode"] == "2"
    with pytest.raises(ValueError, match="launch.nproc_per_node=9 exceeds launch.gpus_per_node=8"):
        LaunchConfig(gpus_per_node=8, nproc_per_node=9)


def test_local_dry_run_runs_one_rank_per_gpu():
    dry = launch(LaunchConfig(gpus_per_node=2), ["--preset", "demo"], dryrun=True)
    assert "--nproc_per_node 2" in dry.rendered and "train.device=cuda" in dry.rendered


@pytest.mark.parametrize("scheduler", ["local_cwd", "kubernetes"])
def test_ranks_of_a_cpu_job_see_no_gpu(scheduler):
    """gpus_per_node 0 on a GPU node: CUDA sees no device (gloo, model on the CPU), not NCCL with the model on the CPU."""
    env = build_appdef(LaunchConfig(scheduler=scheduler), []).roles[0].env
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["DS_ACCELERATOR"] == "cpu"
    # On Kubernetes the NVIDIA container runtime mounts no device either (CUDA images set it to "all").
    assert env.get("NVIDIA_VISIBLE_DEVICES") == ("void" if scheduler == "kubernetes" else None)
    gpu = build_appdef(LaunchConfig(scheduler=scheduler, gpus_per_node=2), []).roles[0].env
    assert not {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "DS_ACCELERATOR"} & set(gpu)


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob"])
def test_grace_period_is_configurable(kind):
    cfg = gpu_cfg(kind=kind, termination_grace_seconds=900)
    job = render(cfg, TRAIN_ARGS)
    assert_valid(job, VOLCANO_CRD if kind == "volcano" else PYTORCHJOB_CRD)
    for tpl in pods(job):
        check_pod(tpl, cfg)
    assert LaunchConfig().termination_grace_seconds == 300  # a final ViT-B save, not Kubernetes' 30 s


def test_nccl_settings_reach_the_ranks_and_only_nccl_names_pass():
    cfg = from_dict(
        LaunchConfig,
        {"gpus_per_node": 8, "nccl_env": "NCCL_SOCKET_IFNAME=eth0,NCCL_IB_HCA=mlx5,NCCL_DEBUG=INFO,TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
         "env": ["NCCL_IB_HCA=mlx5_0"]},
        section="launch",
    )
    env = build_appdef(cfg, []).roles[0].env
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"  # over m3i's default WARN
    assert env["NCCL_IB_HCA"] == "mlx5_0"  # launch.env wins
    for bad in ({"LD_PRELOAD": "x.so"}, {"nccl_debug": "INFO"}, {"NCCL_": "1"}):
        with pytest.raises(ValueError, match="only NCCL_\\* and TORCH_NCCL_\\* names are allowed"):
            LaunchConfig(nccl_env=bad)


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob"])
def test_rdma_is_off_by_default_and_adds_the_device_and_ipc_lock(kind):
    cfg = gpu_cfg(kind=kind, rdma_resource="rdma/ib", rdma_per_node=2)
    job = render(cfg, TRAIN_ARGS)
    assert_valid(job, VOLCANO_CRD if kind == "volcano" else PYTORCHJOB_CRD)
    for tpl in pods(job):
        (c,) = tpl["spec"]["containers"]
        want = {"cpu": "90", "memory": cfg.memory, "nvidia.com/gpu": "8", "rdma/ib": "2"}
        assert c["resources"] == {"requests": want, "limits": want}
        # NCCL pins its RDMA buffers: IPC_LOCK, and nothing else added back.
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": tpl["spec"]})
    for tpl in pods(render(gpu_cfg(kind=kind), TRAIN_ARGS)):
        check_pod(tpl, gpu_cfg(kind=kind))  # capabilities: drop ALL only
        assert not any("rdma" in k for k in tpl["spec"]["containers"][0]["resources"]["limits"])


# --- config validation and CLI ------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"scheduler": "slurm"}, "launch.scheduler='slurm' is not allowed; choose one of ['local_cwd', 'kubernetes']"),
        ({"kind": "mpijob"}, "launch.kind='mpijob' is not allowed"),
        ({"image": "ghcr.io/m3i-project/m3i-train:latest"}, "uses the moving tag 'latest'"),
        ({"image": "ghcr.io/m3i-project/m3i-train"}, "must be a pinned image reference"),
        ({"nodes": 0}, "launch.nodes=0 is out of range"),
        ({"cpu": 0}, "launch.cpu=0.0 is out of range"),
        ({"memory": "32GB"}, "launch.memory: '32GB' is not a Kubernetes quantity"),
        ({"memory": "16Gi", "shm_size": "16Gi"}, "launch.shm_size='16Gi' must be below launch.memory='16Gi'"),
        ({"nproc_per_node": 8, "gpus_per_node": 4}, "launch.nproc_per_node=8 exceeds launch.gpus_per_node=4"),
        ({"tolerations": ["nvidia.com/gpu:NoScheduler"]}, "has effect 'NoScheduler'; choose one of ['NoSchedule'"),
        ({"tolerations": ["bad key"]}, "launch.tolerations entry 'bad key' is malformed"),
        ({"node_selector": {"bad key": "x"}}, "launch.node_selector has 'bad key': 'x'"),
        ({"node_selector": "gpu"}, "launch.node_selector='gpu' must be a mapping"),
        ({"node_selector": {"pool": ["a"]}}, "launch.node_selector['pool']=['a'] must be a string"),
        ({"s3_secret": "My_Secret"}, "launch.s3_secret='My_Secret' is not a Kubernetes name"),
        ({"namespace": "Prod"}, "launch.namespace='Prod' is not a Kubernetes name"),
        ({"name": "x" * 31}, "at most 30 characters"),
        ({"metrics_port": 29499, "nproc_per_node": 2}, "launch.rdzv_port=29500 falls in the metrics ports 29499..29500"),
        ({"metrics_port": 65535, "nproc_per_node": 2}, "launch.metrics_port=65535 + 2 local ranks passes port 65535"),
        ({"rdzv_port": 80}, "launch.rdzv_port=80 is out of range"),
        ({"env": ["AWS_SECRET_ACCESS_KEY=oops"]}, "launch.env sets AWS_SECRET_ACCESS_KEY; credentials come only from the Secret"),
        ({"env": ["NOVALUE"]}, "launch.env entry 'NOVALUE' must look like KEY=VALUE"),
        ({"run_as_user": 0}, "launch.run_as_user=0 is out of range"),
        ({"max_retries": -1}, "launch.max_retries=-1 is out of range"),
        ({"nproc_per_node": -1}, "launch.nproc_per_node=-1 is out of range; allowed [0, 128]"),
        ({"termination_grace_seconds": 0}, "launch.termination_grace_seconds=0 is out of range"),
        ({"nccl_env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "launch.nccl_env sets 'AWS_SECRET_ACCESS_KEY'; only NCCL_*"),
        ({"rdma_resource": "ib"}, "launch.rdma_resource='ib' is not an extended resource name; use domain/name"),
        ({"rdma_resource": "rdma/ib", "rdma_per_node": 0}, "launch.rdma_per_node=0 is out of range"),
        ({"queues": "x"}, "unknown key(s) ['queues']"),
    ],
)
def test_bad_values_name_field_and_value(values, needle):
    with pytest.raises(ValueError) as e:
        from_dict(LaunchConfig, values, section="launch")
    assert needle in str(e.value)


def test_config_values_from_yaml_and_set_strings():
    cfg = from_dict(
        LaunchConfig,
        {
            "node_selector": "cloud.google.com/gke-accelerator=nvidia-h100-80gb,pool=gpu",  # as --set carries it
            "tolerations": "nvidia.com/gpu:NoSchedule,a=b",
            "cpu": "7.5",
            "image": "registry.local:5000/m3i@sha256:" + "a" * 64,
        },
        section="launch",
    )
    assert cfg.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "pool": "gpu"}
    assert cfg.tolerations == ("nvidia.com/gpu:NoSchedule", "a=b") and cfg.cpu == 7.5
    hash(cfg)  # frozen and hashable although node_selector is a dict
    with pytest.raises(ValueError, match="launch.scheduler='local_cwd' renders no Kubernetes object"):
        render(LaunchConfig(), [])


def test_cli_dryrun_prints_a_valid_pytorchjob(capsys):
    parser = argparse.ArgumentParser(prog="m3i")
    add_launch_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["launch", "--scheduler", "kubernetes", "--kind", "pytorchjob", "--nodes", "2", "--set", "launch.queue=training",
         "--set", "launch.gpus_per_node=1", "--dryrun", "--", "--preset", "default"]
    )
    assert args.func is cmd_launch
    assert cmd_launch(args) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert_valid(job, PYTORCHJOB_CRD)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert c["command"][-7:] == ["train", "--preset", "default", *GPU_TAIL]


# --- what m3i launch hands to m3i train ---------------------------------------------------------


def _volcano_command(argv: list[str], capsys) -> list[str]:
    from m3i.cli import main

    assert main(["launch", "--scheduler", "kubernetes", "--dryrun", *argv]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    (c,) = pods(job)[0]["spec"]["containers"]
    script = c["command"][-1] if c["command"][0] == "bash" else " ".join(c["command"])
    return script.split()


def test_launch_config_options_reach_every_rank(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("launch:\n  nodes: 2\nobjective:\n  crop_scale: [0.5, 1.0]\n  mix_images: false\ndata:\n  shards: s3://b/ds\n")
    cmd = _volcano_command(
        ["--preset", "demo", "--config", str(cfg), "--set", "train.steps=7", "--set", "launch.gpus_per_node=0",
         "--", "--set", "train.lr=1e-4"],
        capsys,
    )
    text = " ".join(cmd)
    i = cmd.index("train")
    # the preset, the file's non-launch sections (as --set: pods cannot read this machine's files),
    # the non-launch --set, then what came after `--`, then the metrics port
    assert cmd[i + 1 : i + 3] == ["--preset", "demo"]
    for pair in ("objective.crop_scale=[0.5,", "objective.mix_images=false", "data.shards=s3://b/ds", "train.steps=7"):
        assert pair in text, (pair, text)
    assert "launch." not in text.replace("m3i-launch", "")
    assert text.index("train.steps=7") < text.index("train.lr=1e-4") < text.index("train.device=cpu") < text.index("metrics.port=")
    assert str(cfg) not in text


def test_local_launch_forwards_the_config_file_by_path(tmp_path):
    from m3i.launch.cli import forwarded_train_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  steps: 3\n")
    args = argparse.Namespace(preset="demo", config=str(cfg), overrides=["launch.nodes=1", "data.batch_size=8"])
    assert forwarded_train_args(args, "local_cwd") == ["--preset", "demo", "--config", str(cfg.resolve()), "--set", "data.batch_size=8"]
    assert forwarded_train_args(args, "kubernetes") == ["--preset", "demo", "--set", "train.steps=3", "--set", "data.batch_size=8"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", "train.stepz=3"], "unknown key(s) ['stepz']"),
        (["--", "--set", "model.bogus=1"], "m3i train would refuse its arguments"),
        (["--", "--preset", "nope"], "preset='nope' does not exist"),
        (["--", "--set", "train.steps=0"], "train.steps=0"),
    ],
)
def test_launch_refuses_a_bad_train_config_before_starting(argv, needle, capsys):
    from m3i.cli import main

    assert main(["launch", "--nproc-per-node", "2", *argv]) == 2  # not a dry run: nothing may start
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_readme_launch_line_trains_the_preset_in_two_processes(tmp_path):
    """`m3i launch --preset demo --nproc-per-node 2` for real: the preset reaches both ranks."""
    from tests.conftest import free_port
    from tests.helpers import shard_small, small_demo, train_env

    shards, out = tmp_path / "shards", tmp_path / "run"
    shard_small(small_demo(tmp_path / "raw"), str(shards))
    sets = [f"data.shards={shards}", f"train.output={out}", "train.steps=2", "data.batch_size=8", "data.num_workers=0",
            "checkpoint.interval_steps=2", f"launch.metrics_port={free_port()}", f"launch.rdzv_port={free_port()}"]
    cmd = [sys.executable, "-m", "m3i", "launch", "--preset", "demo", "--nproc-per-node", "2", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # never leave trainers behind a failed test
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    meta = json.loads((out / "checkpoints" / "step-00000002" / "complete.json").read_text())
    assert meta["world_size"] == 2
    assert meta["config"]["model"]["global_pool"] == "max" and meta["config"]["data"]["image_size"] == 32  # the demo preset
    assert meta["config"]["train"]["steps"] == 2
