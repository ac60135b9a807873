"""The Helm chart helm/m3i: lint, render, validate every object, scan, and tie it to the code.

Offline: helm (``tool("helm")``), kubernetes-validate for core kinds, the CRDs in
tests/data/crds for the Prometheus Operator, Kubeflow Trainer and Kueue kinds, checkov, promtool. A missing tool fails
the test with the command that installs it; nothing here is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from m3i.config import load_config
from m3i.config.launch import parse_toleration
from m3i.config.metrics import MetricsConfig
from m3i.evaluate.report import METRIC_NAMES as EVAL_METRIC_NAMES
from m3i.launch import render
from m3i.launch.pod import POD_LABELS
from m3i.launch.trainjob import render_training_runtime
from m3i.metrics import METRIC_NAMES, PROMOTE_METRIC_NAMES, build_metrics
from m3i.pipeline import REGISTRY_SECRET
from tests.k8s_schema import assert_valid, validate_core
from tests.k8s_tools import ROOT, checkov_failures, tool, tool_env
from tests.podmonitor import POD_IP, inline_train_pod, scrape_addresses, selects
from tests.prometheus import require_binary
from tests.test_trainjob import TRAINJOB_CRD, check_restricted_pod, trainer_pod

CHART = ROOT / "helm" / "m3i"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "m3i"
RELEASE = "m3i"
VARIANTS = {"defaults": (), **{f.name.removesuffix("-values.yaml"): ("-f", str(f)) for f in CI_VALUES}}
ALL_ON = ("-f", str(CHART / "ci" / "all-on-values.yaml"))
TRAINJOB = ("-f", str(CHART / "ci" / "trainjob-values.yaml"))
# --set variants that render differently from the ci files (validity and security only).
SET_VARIANTS = {
    "minimal": ("--set", "networkPolicy.enabled=false,pushgateway.enabled=false,storage.bucketJob.enabled=false,rbac.create=false"),
    "train-elsewhere": ("--set", "launch.namespace=m3i-train,networkPolicy.defaultDenyScope=release,image.digest=sha256:" + "a" * 64),
}
RENDERS = {**VARIANTS, **SET_VARIANTS}

CRDS = {
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
    "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "LocalQueue": "kueue.x-k8s.io_localqueues.yaml",
}
CLUSTER_SCOPED = ("Namespace", "PriorityClass", "ClusterTrainingRuntime")
POD_KINDS = ("Deployment", "Job", "Pod")

# Series PromQL in the chart may use besides m3i's own: `up` (Prometheus' scrape health).
EXTRA_SERIES = frozenset({"up"})

# checkov: check id -> why it does not apply to this chart (every skip needs a reason).
CHECKOV_SKIPS = {
    "CKV_K8S_8": "the helm test Pod runs one check and exits; a liveness probe has nothing to watch",
    "CKV_K8S_9": "the helm test Pod runs one check and exits; it serves no traffic to be ready for",
    "CKV_K8S_15": "images are pinned by version tag (MinIO by its RELEASE tag), so IfNotPresent is safe and the brief asks for it",
    "CKV_K8S_35": "m3i (S3Settings.from_env) and MinIO read credentials from env vars by design; they come by secretKeyRef, never as values",
    "CKV_K8S_40": "the m3i images run as UID 1000, the same UID as launch.run_as_user of the training pods; MinIO and the Pushgateway run as high UIDs",
    "CKV_K8S_43": "images are pinned by immutable version tags; every image takes an optional digest value (image.digest, *.image.digest) for digest pinning",
}


# -- helpers ---------------------------------------------------------------------------------


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([tool("helm"), *args], cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout[-2000:]}"
    return proc


@functools.lru_cache(maxsize=None)
def rendered(*values: str) -> str:
    """``helm template`` of the chart into namespace m3i (hooks and tests included)."""
    return helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *values).stdout


def objects(*values: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered(*values)) if d]


def only(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def ci_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def launch_config_file(objs: list[dict[str, Any]], tmp_path: Path) -> Path:
    cm = only(objs, "ConfigMap", "m3i-launch")
    path = tmp_path / "m3i.yaml"
    path.write_text(cm["data"]["m3i.yaml"])
    return path


def rule_groups(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return only(objs, "PrometheusRule")["spec"]["groups"]


_PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                           "offset", "inf", "nan"})


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (Grafana $variables allowed in matchers and ranges)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # the exponent of a number such as 1e-4
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names


@functools.lru_cache(maxsize=None)
def exported_series() -> frozenset[str]:
    """Every series name m3i exports: METRIC_NAMES with histogram families expanded, plus evaluate's and promote's."""
    metrics = build_metrics(MetricsConfig(port=0), rank=0, local_rank=0, run_id="helm-test")
    histograms = {f.name for f in metrics.registry.collect() if f.type == "histogram"}
    assert histograms and histograms <= set(METRIC_NAMES)
    expanded = {f"{h}{suffix}" for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    return frozenset(set(METRIC_NAMES) | expanded | set(EVAL_METRIC_NAMES) | set(PROMOTE_METRIC_NAMES))


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "m3i-training.json").read_text())


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["query"]["query"]))
    return exprs


# -- lint and render -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant):
    out = helm("lint", "--strict", str(CHART), "-n", NAMESPACE, *VARIANTS[variant]).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("variant", RENDERS)
def test_every_rendered_object_is_valid(variant):
    objs = objects(*RENDERS[variant])
    assert objs
    for obj in objs:
        if obj["kind"] in CRDS:
            assert_valid(obj, CRDS[obj["kind"]])
        else:
            validate_core(obj)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']} has no namespace"
        labels = obj["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart", "app.kubernetes.io/component"):
            assert key in labels, f"{obj['kind']} {obj['metadata']['name']} lacks label {key}"
        assert labels["app.kubernetes.io/part-of"] == "m3i"


def test_all_on_renders_every_template():
    sources = set(re.findall(r"^# Source: m3i/(templates/\S+)$", rendered(*ALL_ON), re.M))
    templates = {str(p.relative_to(CHART)) for p in (CHART / "templates").rglob("*.yaml")}
    assert templates <= sources, f"templates the all-on values leave empty: {sorted(templates - sources)}"


def test_defaults_leave_optional_features_off():
    kinds = {o["kind"] for o in objects()}
    assert not kinds & {*CRDS, "PriorityClass", "Namespace", "Secret"}
    jobs = {o["metadata"]["name"] for o in objects() if o["kind"] == "Job"}
    assert jobs == {f"{RELEASE}-bucket"}  # no pipeline hook without Kubeflow


def test_defaults_render_no_credentials():
    for obj in objects():
        assert not (obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData"))), obj["metadata"]["name"]
    # S3 credentials appear only as references to the Secret, never as values.
    for obj in objects(*ALL_ON):
        if obj["kind"] in POD_KINDS:
            for c in containers(obj):
                for env in c.get("env", []):
                    if env["name"].startswith(("AWS_", "MINIO_ROOT", "KFP_TOKEN")):
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], (obj["metadata"]["name"], env)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--set", "bogus=1"), "additional properties 'bogus' not allowed"),
        (("--set", "storage.minio.bogus=1"), "additional properties 'bogus' not allowed"),
        (("--set", "pushgateway.enabled=yes-please"), "/pushgateway/enabled"),
        (("--set", "storage.bucket=123"), "/storage/bucket"),
        (("--set", "launch.kind=slurm"), "/launch/kind"),
        (("--set", "launch.nprocPerNode=9"), "/launch/nprocPerNode"),
        (("--set", "launch.tolerations[0]=gpu:Sometimes"), "/launch/tolerations/0"),
        (("--set", "image.tag=latest"), "/image/tag"),
        (("--set", "monitoring.inlineNamespaces={Kubeflow_User}"), "/monitoring/inlineNamespaces/0"),
        (("--set", "storage.generateSecret=true", "--set", "storage.external.endpoint=https://s3.example.com"),
         "storage.generateSecret only works with the bundled MinIO"),
        (("--set", "trainer.runtime.cluster=maybe"), "/trainer/runtime/cluster"),
        (("--set", "trainer.runtime.name=M3I_Torch"), "/trainer/runtime/name"),
        (("--set", "kueue.localQueue.apiVersion=kueue.x-k8s.io/v1"), "/kueue/localQueue/apiVersion"),
        (("--set", "kueue.bogus=1"), "additional properties 'bogus' not allowed"),
        (("--set", "launch.kind=trainjob,launch.rdzvPort=29600"),
         "launch.rdzvPort=29600 cannot apply with launch.kind=trainjob"),
        (("--set", "kueue.enabled=true,kueue.localQueue.create=true,kueue.localQueue.name=other"),
         "kueue.localQueue.name=other differs from launch.queue=default"),
        (("--set", "trainer.runtime.enabled=true,launch.metricsPort=29495"),
         "the runtime's metrics ports 29495..29502 cover Kubeflow Trainer's torch port 29500"),
        (("--set", "launch.ncclEnv.LD_PRELOAD=x.so"), "/launch/ncclEnv"),
        (("--set", "launch.rdmaResource=ib"), "/launch/rdmaResource"),
        (("--set", "modelRegistry.url=ftp://registry:8080"), "/modelRegistry/url"),
        (("--set", "modelRegistry.url=http://registry:8080/api"), "/modelRegistry/url"),
        (("--set", "modelRegistry.tokenSecret=my-token"), "/modelRegistry/tokenSecret"),
        (("--set", "monitoring.rules.rejectedInARow=0"), "/monitoring/rules/rejectedInARow"),
        (("--set", "launch.terminationGraceSeconds=0"), "/launch/terminationGraceSeconds"),
        (("--set", "launch.gpusPerNode=16"), "launch.gpusPerNode=16 runs one rank per GPU, more than the 8"),
        (("--set", "namespace.create=true,launch.rdmaResource=rdma/ib"),
         'launch.rdmaResource=rdma/ib adds capability IPC_LOCK, which only a namespace enforcing Pod Security "privileged" '
         "admits: set namespace.allowPrivileged=true"),
        (("--set", "namespace.create=true,namespace.allowPrivileged=true,launch.rdmaResource=rdma/ib"),
         'launch.rdmaResource=rdma/ib adds capability IPC_LOCK, which Pod Security "restricted" refuses'),
    ],
)
def test_schema_and_checks_reject_bad_values(args, message):
    proc = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args, check=False)
    assert proc.returncode != 0, f"helm template accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_schema_objects_are_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{where} is open"
            for key, sub in node.items():
                walk(sub, f"{where}.{key}")
        elif isinstance(node, list):
            for k, sub in enumerate(node):
                walk(sub, f"{where}[{k}]")

    walk(schema, "$")


def test_every_value_has_a_comment():
    """Each key of values.yaml that the schema describes carries a comment line above it.

    Kubernetes' own types (resources, label selectors) are documented upstream: only the key
    that holds one needs a comment.
    """
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []

    def walk(node: yaml.MappingNode, sch: dict[str, Any], where: str) -> None:
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line
            above = lines[line - 1].strip() if line else ""
            if not above.startswith("#") and "#" not in lines[line]:
                missing.append(f"{where}{key} (line {line + 1})")
            sub = sch.get("properties", {}).get(key, {})
            native = key in ("resources", "podSelector")
            if isinstance(value_node, yaml.MappingNode) and not value_node.flow_style and "properties" in sub and not native:
                walk(value_node, sub, f"{where}{key}.")

    walk(yaml.compose("\n".join(lines)), schema, "")
    assert not missing, f"values without a comment: {missing}"


# -- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", RENDERS)
def test_every_container_is_restricted_and_pinned(variant):
    pods = [o for o in objects(*RENDERS[variant]) if o["kind"] in POD_KINDS]
    assert pods
    for obj in pods:
        spec = pod_spec(obj)
        name = f"{obj['kind']} {obj['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, name
            assert isinstance(sc["runAsGroup"], int), name
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert sc["readOnlyRootFilesystem"] is True, name
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{name}/{c['name']} {part}"
            assert c["imagePullPolicy"] == "IfNotPresent", name
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[A-Za-z0-9_][A-Za-z0-9_.-]*$", image.rsplit("/", 1)[-1]), image
            assert not image.endswith(":latest"), image
            # A read-only root needs a writable /tmp.
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, f"{name}/{c['name']}"


def test_minio_is_pinned_probed_and_non_root():
    dep = only(objects(), "Deployment", f"{RELEASE}-minio")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", c["image"]), c["image"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] >= 1000
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert env["MINIO_ROOT_USER"] == {"name": "m3i-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["MINIO_ROOT_PASSWORD"] == {"name": "m3i-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    pvc = only(objects(), "PersistentVolumeClaim")
    assert dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_external_s3_replaces_minio():
    objs = objects(*VARIANTS["external-s3"])
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert not {n for n in names if "minio" in n[1]} and not any(o["kind"] == "PersistentVolumeClaim" for o in objs)
    egress = only(objs, "NetworkPolicy", f"{RELEASE}-to-services")["spec"]["egress"]
    want = ci_values("external-s3")["networkPolicy"]["externalStorage"]
    assert {"to": want["to"], "ports": [{"port": p, "protocol": "TCP"} for p in want["ports"]]} in egress


def test_rbac_is_least_privilege():
    objs = objects(*ALL_ON)
    role = only(objs, "Role", f"{RELEASE}-pipeline")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    crud = {"create", "get", "list", "watch", "delete"}
    assert rules == {
        ("batch.volcano.sh", "jobs"): crud,
        ("kubeflow.org", "pytorchjobs"): crud,
        ("trainer.kubeflow.org", "trainjobs"): crud,
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"get", "list", "watch"},
    }
    assert "*" not in json.dumps(role["rules"])
    binding = only(objs, "RoleBinding", f"{RELEASE}-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
    assert subjects == {("ServiceAccount", "m3i-pipeline", NAMESPACE),
                        ("ServiceAccount", "default-editor", "kubeflow-user-example-com")}
    sas = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
    assert sas["m3i-train"]["automountServiceAccountToken"] is False
    assert {"m3i-pipeline", "m3i-train"} <= set(sas)
    assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in objs)


def test_network_policies_allow_only_what_m3i_needs():
    objs = objects(*ALL_ON)
    pols = {o["metadata"]["name"].removeprefix(f"{RELEASE}-"): o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    deny = pols["default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, spec in pols.items():
        for rule in spec.get("ingress", []):
            assert rule.get("from") and rule.get("ports"), f"{name}: an ingress rule open to every source or port"
        for rule in spec.get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule open to every destination"
    # Storage: only pods of this namespace, on the S3 port.
    (ing,) = pols["storage"]["ingress"]
    assert ing == {"from": [{"podSelector": {}}], "ports": [{"port": 9000, "protocol": "TCP"}]}
    # Training pods: all TCP among themselves (rendezvous, NCCL), metrics from the monitoring namespace.
    train = pols["train"]
    assert train["podSelector"] == {"matchLabels": POD_LABELS}
    peers, scrape = train["ingress"]
    assert peers["from"] == [{"podSelector": {"matchLabels": POD_LABELS}}]
    assert peers["ports"] == [{"protocol": "TCP", "port": 1, "endPort": 65535}]
    assert scrape["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9400, "endPort": 9407}]
    assert train["egress"] == [{"to": peers["from"], "ports": peers["ports"]}]
    # DNS and the API server.
    assert {p["port"] for p in pols["dns"]["egress"][0]["ports"]} == {53}
    api = pols["pipeline-apiserver"]["egress"][0]
    assert [p["ipBlock"]["cidr"] for p in api["to"]] == ci_values("all-on")["networkPolicy"]["apiServer"]["cidrs"]
    # Release scope: the default deny leaves pods of other apps alone.
    scoped = only(objects("--set", "networkPolicy.defaultDenyScope=release"), "NetworkPolicy", f"{RELEASE}-default-deny")
    assert scoped["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "m3i"}}


def test_training_namespace_can_differ(tmp_path):
    objs = objects(*SET_VARIANTS["train-elsewhere"], "--set", "monitoring.enabled=true")
    where = {(o["kind"], o["metadata"]["name"]): o["metadata"].get("namespace") for o in objs}
    assert where[("ServiceAccount", "m3i-train")] == "m3i-train"
    assert where[("Role", f"{RELEASE}-pipeline")] == where[("RoleBinding", f"{RELEASE}-pipeline")] == "m3i-train"
    assert where[("ServiceAccount", "m3i-pipeline")] == NAMESPACE  # bound across namespaces
    assert only(objs, "PodMonitor", f"{RELEASE}-train")["spec"]["namespaceSelector"] == {"matchNames": ["m3i-train"]}
    # The in-pod train step runs with the pipeline, not in launch.namespace.
    assert only(objs, "PodMonitor", f"{RELEASE}-train-inline")["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    inline = only(objs, "NetworkPolicy", f"{RELEASE}-train-inline")
    assert inline["metadata"]["namespace"] == NAMESPACE
    assert selects(inline["spec"]["podSelector"], inline_train_pod()["metadata"]["labels"])
    (rule,) = inline["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9400, "endPort": 9407}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert load_config(None, launch_config_file(objs, tmp_path), []).launch.namespace == "m3i-train"
    assert all(c["image"] == "ghcr.io/m3i-project/m3i@sha256:" + "a" * 64
               for o in objs if o["kind"] in ("Job", "Pod") for c in containers(o))


# -- the launch config and the pods it renders -----------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_launch_configmap_loads_as_m3i_config(variant, tmp_path):
    objs = objects(*VARIANTS[variant])
    cfg = load_config(None, launch_config_file(objs, tmp_path), [])
    values = ci_values(variant) if variant != "defaults" else {}
    launch = values.get("launch", {})
    sl = cfg.launch
    assert sl.scheduler == "kubernetes" and sl.namespace == NAMESPACE
    assert sl.image == "ghcr.io/m3i-project/m3i-train:0.1.0"
    assert sl.kind == launch.get("kind", "volcano") and sl.queue == launch.get("queue", "default")
    assert sl.node_selector == launch.get("nodeSelector", {})
    assert sl.tolerations == tuple(launch.get("tolerations", ["nvidia.com/gpu:NoSchedule"]))
    assert sl.service_account == "m3i-train" and sl.s3_secret == "m3i-s3"
    pc = values.get("priorityClass", {})
    assert sl.priority_class == ("m3i-train" if pc.get("create") else None)
    runtime = values.get("trainer", {}).get("runtime", {})
    assert sl.runtime == runtime.get("name", "m3i-torch")
    assert sl.runtime_kind == ("ClusterTrainingRuntime" if runtime.get("cluster") else "TrainingRuntime")
    assert sl.kueue is values.get("kueue", {}).get("enabled", False)
    if "gpusPerNode" in launch:  # one rank per GPU unless nprocPerNode is given
        ranks = launch.get("nprocPerNode") or launch["gpusPerNode"]
        assert (sl.nodes, sl.ranks_per_node, sl.gpus_per_node) == (launch["nodes"], ranks, launch["gpusPerNode"])
    assert sl.termination_grace_seconds == launch.get("terminationGraceSeconds", 300)
    assert sl.nccl_env == launch.get("ncclEnv", {}) and sl.rdma_resource is None  # RDMA off unless asked for
    if objs and any(o["kind"] == "Deployment" and o["metadata"]["name"].endswith("pushgateway") for o in objs):
        url = f"http://{RELEASE}-pushgateway.{NAMESPACE}.svc:9091"
        assert cfg.metrics.pushgateway == url and cfg.evaluate.pushgateway == url and cfg.promote.pushgateway == url


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob", "trainjob"])
def test_podmonitor_and_policies_match_the_training_pods(kind, tmp_path):
    """The chart's PodMonitor and NetworkPolicy select exactly what m3i.launch.render gives training pods
    (for a TrainJob: the pod Kubeflow Trainer makes of it on the chart's runtime)."""
    objs = objects(*ALL_ON)
    cfg = load_config(None, launch_config_file(objs, tmp_path), []).launch
    cfg = dataclasses.replace(cfg, kind=kind)
    assert cfg.nproc_per_node == 8  # all eight metrics ports in use
    job = render(cfg, ["--preset", "default"])
    assert job["metadata"]["namespace"] == cfg.namespace
    if kind == "volcano":
        templates = [t["template"] for t in job["spec"]["tasks"]]
    elif kind == "pytorchjob":
        templates = [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
    else:
        assert_valid(job, TRAINJOB_CRD)
        templates = [trainer_pod(only(objs, cfg.runtime_kind, cfg.runtime), job)]
    monitor = only(objs, "PodMonitor", f"{RELEASE}-train")
    inline = only(objs, "PodMonitor", f"{RELEASE}-train-inline")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [cfg.namespace]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == POD_LABELS
    monitored = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    train_policy = only(objs, "NetworkPolicy", f"{RELEASE}-train")["spec"]
    scrape_ports = train_policy["ingress"][1]["ports"][0]
    for tpl in templates:
        labels = tpl["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert train_policy["podSelector"]["matchLabels"].items() <= labels.items()
        spec = tpl["spec"]
        assert spec["serviceAccountName"] == only(objs, "ServiceAccount", "m3i-train")["metadata"]["name"]
        assert spec["priorityClassName"] == only(objs, "PriorityClass")["metadata"]["name"]
        assert spec["tolerations"] == [parse_toleration(t) for t in ci_values("all-on")["launch"]["tolerations"]]
        (c,) = spec["containers"]
        ports = {p.get("name", ""): p["containerPort"] for p in c.get("ports", [])}  # the Trainer adds 29500 unnamed
        metrics = {n: p for n, p in ports.items() if n.startswith("metrics")}
        assert sorted(metrics) == sorted(monitored), f"pod ports {sorted(metrics)} vs PodMonitor {monitored}"
        assert all(scrape_ports["port"] <= p <= scrape_ports["endPort"] for p in metrics.values())
        # Every rank once, by the -train PodMonitor only.
        assert scrape_addresses(monitor, tpl) == sorted(f"{POD_IP}:{p}" for p in metrics.values())
        assert scrape_addresses(inline, tpl) == []
        assert cfg.rdzv_port in ports.values()  # reachable: training pods allow each other all TCP
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert refs == {ci_values("all-on")["storage"].get("existingSecret", "m3i-s3")}


# -- monitoring ------------------------------------------------------------------------------


def test_servicemonitor_scrapes_the_pushgateway_with_honor_labels():
    objs = objects(*ALL_ON)
    sm = only(objs, "ServiceMonitor")
    (ep,) = sm["spec"]["endpoints"]
    assert ep["honorLabels"] is True
    svc = only(objs, "Service", f"{RELEASE}-pushgateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    for obj in (sm, *(o for o in objs if o["kind"] == "PodMonitor"), only(objs, "PrometheusRule")):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize(
    "values, namespaces, base_port",
    [
        (("--set", "monitoring.enabled=true"), [NAMESPACE], 9400),
        (ALL_ON, ci_values("all-on")["monitoring"]["inlineNamespaces"], 9400),
        (("--set", "monitoring.enabled=true,launch.metricsPort=9500"), [NAMESPACE], 9500),
    ],
)
def test_inline_podmonitor_scrapes_the_in_pod_train_step(values, namespaces, base_port):
    """The compiled pipeline's in-pod train step: scraped on every rank port by -train-inline
    alone, in monitoring.inlineNamespaces, and admitted by -train when it runs here."""
    objs = objects(*values)
    pod = inline_train_pod()
    labels = pod["metadata"]["labels"]
    assert labels["m3i.io/launcher"] == "inline"
    inline = only(objs, "PodMonitor", f"{RELEASE}-train-inline")
    main = only(objs, "PodMonitor", f"{RELEASE}-train")
    selected = ("app.kubernetes.io/part-of", "m3i.io/launcher")
    assert inline["spec"]["selector"] == {"matchLabels": {k: labels[k] for k in selected}}
    assert inline["spec"]["namespaceSelector"] == {"matchNames": namespaces}
    assert scrape_addresses(inline, pod) == [f"{POD_IP}:{base_port + r}" for r in range(8)]
    assert scrape_addresses(main, pod) == []
    assert {"key": "m3i.io/launcher", "operator": "DoesNotExist"} in main["spec"]["selector"]["matchExpressions"]
    timing = {(ep["interval"], ep["scrapeTimeout"]) for ep in main["spec"]["podMetricsEndpoints"]}
    for ep in inline["spec"]["podMetricsEndpoints"]:
        assert ep["path"] == "/metrics" and {(ep["interval"], ep["scrapeTimeout"])} == timing
        assert not {"port", "portNumber", "targetPort"} & set(ep), "KFP declares no ports: a port filter keeps no target"
    train = only(objs, "NetworkPolicy", f"{RELEASE}-train")["spec"]
    assert selects(train["podSelector"], labels)
    assert train["ingress"][1]["ports"] == [{"protocol": "TCP", "port": base_port, "endPort": base_port + 7}]


def test_rules_pass_promtool(tmp_path):
    promtool = require_binary("promtool")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups(objects(*ALL_ON))}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = {r["alert"] for g in rule_groups(objects(*ALL_ON)) for r in g["rules"]}
    assert alerts == {"TrainingStalled", "TrainingNaNSteps", "CheckpointsFailing", "RetrainsRejected", "ChampionStale"}


def test_promotion_alerts_fire_on_the_pushed_promotion_series(tmp_path):
    """promtool's rule unit tests: N rejections in a row and a champion older than the set age, per model."""
    promtool = require_binary("promtool")
    groups = rule_groups(objects("--set", "monitoring.enabled=true,monitoring.rules.rejectedInARow=2,monitoring.rules.championMaxAgeDays=7"))
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    # what push_promotion_metrics pushes (job m3i-promote, grouping key model), as the ServiceMonitor keeps it
    pushed = {"job": "m3i-promote", "model": "m3i", "instance": "10.0.0.9:9091", "namespace": "m3i"}
    other = {**pushed, "model": "other"}

    def sel(name: str, labels: dict[str, str]) -> str:
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"

    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1h",
        "tests": [{
            "interval": "1d",
            "input_series": [
                # one rejection a day from day 1 to 3, then a promotion resets the count on day 4
                {"series": sel("m3i_promote_consecutive_rejections", pushed), "values": "0 1 2 3 0x6"},
                {"series": sel("m3i_promote_consecutive_rejections", other), "values": "0x9"},
                # model m3i's champion was set at t=0; other's is promoted anew on day 4 (345600 s)
                {"series": sel("m3i_promote_champion_timestamp_seconds", pushed), "values": "0x9"},
                {"series": sel("m3i_promote_champion_timestamp_seconds", other), "values": "0x3 345600x6"},
            ],
            "alert_rule_test": [
                {"eval_time": "1d", "alertname": "RetrainsRejected", "exp_alerts": []},
                {"eval_time": "2d", "alertname": "RetrainsRejected",
                 "exp_alerts": [{"exp_labels": {**pushed, "severity": "warning"}}]},
                {"eval_time": "5d", "alertname": "RetrainsRejected", "exp_alerts": []},
                {"eval_time": "6d", "alertname": "ChampionStale", "exp_alerts": []},
                {"eval_time": "8d", "alertname": "ChampionStale",
                 "exp_alerts": [{"exp_labels": {**pushed, "severity": "warning"}}]},
            ],
        }],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_model_registry_is_off_by_default_and_its_token_comes_only_by_reference(tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())["modelRegistry"]
    assert values["url"] == "" and values["tokenSecret"] == REGISTRY_SECRET  # the Secret the compiled pipeline reads
    assert load_config(None, launch_config_file(objects(), tmp_path), []).promote.registry.url == ""
    url = ci_values("all-on")["modelRegistry"]["url"]
    objs = objects(*ALL_ON)
    registry = load_config(None, launch_config_file(objs, tmp_path), []).promote.registry
    assert (registry.url, registry.token_env) == (url, "M3I_MODEL_REGISTRY_TOKEN")
    # the chart holds no token: it neither renders that Secret nor an env var of the token (the pipeline's steps get it)
    assert not [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == REGISTRY_SECRET]
    assert "M3I_MODEL_REGISTRY_TOKEN" not in rendered(*ALL_ON)


def test_alerts_fire_on_the_trainer_series(tmp_path):
    """promtool's rule unit tests: each alert fires on the series it watches and not before."""
    promtool = require_binary("promtool")
    groups = rule_groups(objects("--set", "monitoring.enabled=true"))
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)  # templates are checked by `promtool check rules`
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    target = {"namespace": "m3i", "pod": "m3i-train-abc-0", "instance": "10.0.0.7:9401", "job": "m3i/m3i-train"}
    series = {**target, "rank": "1", "run_id": "r1"}

    def sel(name: str, labels: dict[str, str]) -> str:
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"

    def fired(severity: str) -> list[dict[str, Any]]:
        return [{"exp_labels": {**series, "severity": severity}}]

    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # 10 steps a minute for 10 minutes, then stuck while the endpoint stays up.
                {"series": sel("m3i_train_steps_total", series), "values": "0+10x10 100x50"},
                {"series": sel("up", target), "values": "1x60"},
                {"series": sel("m3i_train_skipped_steps_total", series), "values": "0x10 1+1x4 5x45"},
                {"series": sel("m3i_train_checkpoint_failures_total", series), "values": "0x20 1x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "TrainingStalled", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "TrainingStalled", "exp_alerts": fired("critical")},
                {"eval_time": "9m", "alertname": "TrainingNaNSteps", "exp_alerts": []},
                {"eval_time": "13m", "alertname": "TrainingNaNSteps", "exp_alerts": fired("warning")},
                {"eval_time": "30m", "alertname": "TrainingNaNSteps", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "CheckpointsFailing", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "CheckpointsFailing", "exp_alerts": fired("critical")},
            ],
        }],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promql_names_only_exported_metrics():
    exported = exported_series()
    exprs = [r["expr"] for g in rule_groups(objects(*ALL_ON)) for r in g["rules"]] + dashboard_exprs(dashboard())
    used = set().union(*(promql_metrics(e) for e in exprs))
    assert used, "no metric found: the PromQL parser is broken"
    assert used <= exported | EXTRA_SERIES, f"not exported by m3i: {sorted(used - exported - EXTRA_SERIES)}"
    # The parser itself: functions, keywords, label lists and numbers are not metric names.
    assert promql_metrics('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y(z)"}[$__rate_interval]))) > 1e-4 and on (pod) up == 1') == {"a_bucket", "up"}


def test_dashboard_has_the_panels_and_a_datasource_variable():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    by_metric = {}
    for p in panels:
        for t in p["targets"]:
            for name in promql_metrics(t["expr"]):
                by_metric.setdefault(name, set()).add(p["title"])
    assert "by (part)" in " ".join(t["expr"] for p in panels for t in p["targets"] if "m3i_train_loss" in t["expr"])
    for metric in ("m3i_train_loss", "m3i_train_samples_per_second", "m3i_train_data_wait_seconds_bucket",
                   "m3i_train_checkpoint_seconds_sum", "m3i_train_gpu_memory_bytes", "m3i_train_skipped_steps_total",
                   "m3i_train_step_seconds_bucket"):
        assert metric in by_metric, f"no panel shows {metric}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # The chart ships the file as is.
    cm = only(objects(*ALL_ON), "ConfigMap", f"{RELEASE}-dashboard")
    assert json.loads(cm["data"]["m3i-training.json"]) == dash
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


# -- the pipeline hook and helm test ---------------------------------------------------------


def test_hook_uploads_then_schedules_with_the_values():
    values = ci_values("all-on")["pipeline"]["hook"]
    objs = objects(*ALL_ON)
    job = only(objs, "Job", f"{RELEASE}-pipeline-hook")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install,post-upgrade"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] > 0
    spec = job["spec"]["template"]["spec"]
    (upload,), (schedule,) = spec["initContainers"], spec["containers"]
    assert upload["command"] == ["m3i", "pipeline", "upload"]
    sched = values["schedule"]
    params = [x for k, v in sorted(sched["params"].items()) for x in ("--param", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    assert schedule["command"] == [
        "m3i", "pipeline", "schedule", "--cron", sched["cron"], "--name", sched["name"],
        "--experiment", sched["experiment"], *params, "--service-account", sched["serviceAccount"],
    ]
    assert "--param" in schedule["command"] and "steps=100000" in schedule["command"]
    # Every parameter the values pass is one the packaged pipeline takes.
    packaged = next(yaml.safe_load_all((ROOT / "m3i" / "pipeline" / "m3i-pretrain.yaml").read_text()))
    assert set(sched["params"]) <= set(packaged["root"]["inputDefinitions"]["parameters"])
    for c in (upload, schedule):
        assert c["image"] == "ghcr.io/m3i-project/m3i:0.1.0"
        env = {e["name"]: e for e in c["env"]}
        assert env["KFP_HOST"]["value"] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
        assert env["KFP_NAMESPACE"]["value"] == values["kfp"]["namespace"]
        assert env["KFP_TOKEN"]["valueFrom"]["secretKeyRef"] == values["kfp"]["tokenSecret"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/var/run/secrets/kubeflow/pipelines"] == "kfp-token"
    vols = {v["name"]: v for v in spec["volumes"]}
    token = vols["kfp-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org" and token["path"] == "token"
    sa = only(objs, "ServiceAccount", spec["serviceAccountName"])
    binding = only(objs, "RoleBinding", spec["serviceAccountName"])
    assert binding["metadata"]["namespace"] == values["kfp"]["namespace"]
    assert binding["roleRef"]["kind"] == "ClusterRole" and binding["subjects"][0]["name"] == sa["metadata"]["name"]
    # Without params, service account or token Secret the command and env stay minimal.
    plain = only(objects("--set", "pipeline.hook.enabled=true"), "Job", f"{RELEASE}-pipeline-hook")
    (c,) = plain["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["m3i", "pipeline", "schedule", "--cron", "0 0 2 * * *", "--name", "m3i-pretrain-nightly",
                            "--experiment", "m3i"]
    assert {e["name"] for e in c["env"]} == {"KFP_HOST", "HOME"}


def test_helm_test_pod_checks_storage_and_pushgateway():
    pod = only(objects(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    script = c["command"][-1]
    assert "bucket_exists" in script and "/-/ready" in script
    env = {e["name"]: e for e in c["env"]}
    assert env["M3I_PUSHGATEWAY"]["value"] == f"http://{RELEASE}-pushgateway.{NAMESPACE}.svc:9091"
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"] == {"name": "m3i-s3", "key": "AWS_ENDPOINT_URL"}
    compile(script, "helm-test", "exec")  # the snippet is valid Python
    bucket = only(objects(), "Job", f"{RELEASE}-bucket")
    compile(bucket["spec"]["template"]["spec"]["containers"][0]["command"][-1], "bucket-job", "exec")


def test_notes_say_how_to_label_the_namespace_and_create_the_secret():
    out = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client").stdout
    notes = out[out.index("NOTES:"):]
    assert f"kubectl label ns {NAMESPACE} pod-security.kubernetes.io/enforce=restricted" in notes
    assert f"kubectl -n {NAMESPACE} create secret generic m3i-s3" in notes
    assert f"helm test {RELEASE} -n {NAMESPACE}" in notes


# -- checkov ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_all_on(tmp_path_factory) -> list[str]:
    """checkov's failed checks on the all-on render (hooks and the test pod included); run once."""
    path = tmp_path_factory.mktemp("checkov") / "m3i-all-on.yaml"
    path.write_text(rendered(*ALL_ON))
    return checkov_failures(["-f", str(path)], "kubernetes", CHECKOV_SKIPS)


def test_checkov_passes_all_on(checkov_all_on):
    assert checkov_all_on == [], "\n".join(checkov_all_on)


# -- Kubeflow Trainer runtime and Kueue -------------------------------------------------------


def runtime_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (rt,) = [o for o in objs if o["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime")]
    return rt


@pytest.mark.parametrize("values", [TRAINJOB, ALL_ON], ids=["trainjob", "all-on"])
def test_trainer_runtime_matches_the_renderer(values, tmp_path):
    """The chart's runtime is what m3i.launch.trainjob renders from the chart's own launch ConfigMap."""
    objs = objects(*values)
    cfg = load_config(None, launch_config_file(objs, tmp_path), []).launch
    rt = runtime_of(objs)
    assert_valid(rt, CRDS[rt["kind"]])
    want = render_training_runtime(cfg)  # follows launch.runtime_kind, which the chart sets from trainer.runtime.cluster
    assert (rt["kind"], rt["metadata"]["name"]) == (want["kind"], cfg.runtime)
    assert rt["metadata"].get("namespace") == want["metadata"].get("namespace")
    assert rt["spec"] == want["spec"]
    assert rt["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    pod = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    check_restricted_pod(pod)
    assert pod["spec"].get("serviceAccountName") == (None if rt["kind"] == "ClusterTrainingRuntime" else "m3i-train")


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob", "trainjob"])
def test_gpu_nccl_rdma_and_grace_values_reach_every_training_pod(kind, tmp_path):
    """gpusPerNode alone fills the GPUs; ncclEnv, rdmaResource and terminationGraceSeconds ride the ConfigMap into
    the pods of every kind (and the grace period into the runtime), valid against each CRD."""
    sets = (f"launch.kind={kind},launch.gpusPerNode=8,launch.terminationGraceSeconds=900,launch.ncclEnv.NCCL_IB_HCA=mlx5,"
            "launch.rdmaResource=rdma/ib,launch.rdmaPerNode=2,trainer.runtime.enabled=true,namespace.create=true,"
            "namespace.podSecurity=privileged,namespace.allowPrivileged=true")
    objs = objects("--set", sets)
    cfg = load_config(None, launch_config_file(objs, tmp_path), []).launch
    assert (cfg.ranks_per_node, cfg.termination_grace_seconds, cfg.nccl_env) == (8, 900, {"NCCL_IB_HCA": "mlx5"})
    assert (cfg.rdma_resource, cfg.rdma_per_node) == ("rdma/ib", 2)
    rt = runtime_of(objs)
    assert rt["spec"] == render_training_runtime(cfg)["spec"]
    assert rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 900
    job = render(cfg, ["--preset", "default"])
    if kind == "trainjob":
        assert_valid(job, TRAINJOB_CRD)
        pod = trainer_pod(rt, job)
        validate_core(pod)
        spec = pod["spec"]
    else:
        assert_valid(job, "batch.volcano.sh_jobs.yaml" if kind == "volcano" else "kubeflow.org_pytorchjobs.yaml")
        spec = (job["spec"]["tasks"][0]["template"] if kind == "volcano" else job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])["spec"]
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert spec["terminationGracePeriodSeconds"] == 900 and env["M3I_TERMINATION_GRACE_SECONDS"] == "900"
    assert env["NCCL_IB_HCA"] == "mlx5"
    assert c["resources"]["limits"]["rdma/ib"] == "2" and c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert only(objs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_trainer_runtime_and_localqueue_are_off_by_default(tmp_path):
    objs = objects()
    assert not {o["kind"] for o in objs} & {"TrainingRuntime", "ClusterTrainingRuntime", "LocalQueue"}
    launch = load_config(None, launch_config_file(objs, tmp_path), []).launch
    assert (launch.runtime, launch.runtime_kind, launch.kueue) == ("m3i-torch", "TrainingRuntime", False)


def test_trainjob_values_launch_a_valid_queued_trainjob(tmp_path):
    """ci/trainjob-values.yaml: the ConfigMap's TrainJob names the chart's runtime and LocalQueue, and the
    pod the Trainer makes of the pair is a restricted m3i training pod."""
    objs = objects(*TRAINJOB)
    cfg = load_config(None, launch_config_file(objs, tmp_path), []).launch
    assert (cfg.kind, cfg.kueue, cfg.queue) == ("trainjob", True, "training")
    job = render(cfg, ["--preset", "default"])
    assert_valid(job, TRAINJOB_CRD)
    rt = runtime_of(objs)
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": rt["kind"], "name": rt["metadata"]["name"]}
    assert job["metadata"]["namespace"] == rt["metadata"]["namespace"]  # a TrainingRuntime serves its own namespace
    queue = only(objs, "LocalQueue")
    assert_valid(queue, CRDS["LocalQueue"])
    assert queue["apiVersion"] == "kueue.x-k8s.io/v1beta1" and queue["spec"] == {"clusterQueue": "cluster-queue"}
    assert (queue["metadata"]["name"], queue["metadata"]["namespace"]) == (job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
                                                                          job["metadata"]["namespace"])
    pod = trainer_pod(rt, job)
    validate_core(pod)
    check_restricted_pod(pod)
    assert pod["spec"]["serviceAccountName"] == "m3i-train" and pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert rt["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 2}
    # The chart's Volcano Jobs carry the same label when kueue.enabled is on.
    volcano = render(dataclasses.replace(cfg, kind="volcano"), ["--preset", "default"])
    assert volcano["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "training"


def test_kueue_with_pytorchjob_labels_the_pytorchjob(tmp_path):
    """kueue.enabled with launch.kind=pytorchjob renders: the ConfigMap's PyTorchJob carries Kueue's queue label
    (Kueue's kubeflow.org/pytorchjob integration), next to the chart's LocalQueue of that name."""
    objs = objects("--set", "kueue.enabled=true,kueue.localQueue.create=true,launch.kind=pytorchjob,launch.queue=training")
    cfg = load_config(None, launch_config_file(objs, tmp_path), []).launch
    assert (cfg.kind, cfg.kueue, cfg.queue) == ("pytorchjob", True, "training")
    job = render(cfg, ["--preset", "default"])
    assert_valid(job, "kubeflow.org_pytorchjobs.yaml")
    queue = only(objs, "LocalQueue")
    assert (job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], job["metadata"]["namespace"]) == (
        queue["metadata"]["name"], queue["metadata"]["namespace"])


def test_localqueue_values():
    queue = only(objects(*ALL_ON), "LocalQueue")
    assert_valid(queue, CRDS["LocalQueue"])
    values = ci_values("all-on")
    assert queue["apiVersion"] == values["kueue"]["localQueue"]["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    assert queue["metadata"]["name"] == values["launch"]["queue"]  # empty name: launch.queue
    assert queue["spec"]["clusterQueue"] == "gpu-cluster-queue"
    named = only(objects("--set", "kueue.localQueue.create=true,kueue.localQueue.name=team-a,launch.namespace=m3i-train"), "LocalQueue")
    assert (named["metadata"]["name"], named["metadata"]["namespace"]) == ("team-a", "m3i-train")


def test_checkov_passes_the_trainer_pod(tmp_path):
    """checkov reads no TrainingRuntime: scan the pod Kubeflow Trainer makes of a TrainJob on the all-on
    runtime instead, next to the chart's NetworkPolicies (CKV2_K8S_6 wants one to select it)."""
    objs = objects(*ALL_ON)
    cfg = load_config(None, launch_config_file(objs, tmp_path), []).launch
    cfg = dataclasses.replace(cfg, kind="trainjob")
    pod = trainer_pod(only(objs, cfg.runtime_kind, cfg.runtime), render(cfg, ["--preset", "default"]))
    pod["metadata"]["namespace"] = cfg.namespace
    path = tmp_path / "trainer-pod.yaml"
    path.write_text(yaml.safe_dump_all([*objs, pod], sort_keys=False))
    skips = {
        **CHECKOV_SKIPS,
        "CKV_K8S_8": "a training pod runs to completion and serves only metrics; a hung rank is the TrainingStalled alert's, "
        "and a liveness restart would break torchrun's static rendezvous (the helm test Pod likewise runs one check and exits)",
        "CKV_K8S_9": "a training pod serves no traffic to be ready for, nor does the helm test Pod",
    }
    assert checkov_failures(["-f", str(path)], "kubernetes", skips) == []
