"""manifests/: every kustomize target renders offline, validates, passes checkov, and keeps
the promises the m3i code relies on (training pod labels and metrics ports, the launch
section, least-privilege RBAC, restricted pods, default-deny networking, no secret values).
The optional Kubeflow Trainer runtime (components/trainer-runtime) is rendered with dev and
prod and must equal what m3i.launch.trainjob renders."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from m3i.config import load_config
from m3i.config.launch import S3_SECRET_KEYS, LaunchConfig
from m3i.launch import render
from m3i.launch.pod import POD_LABELS
from m3i.launch.trainjob import render_training_runtime
from tests.k8s_schema import assert_valid, validate_core
from tests.k8s_tools import ROOT, checkov_failures
from tests.podmonitor import POD_IP, inline_train_pod, scrape_addresses, selects
from tests.test_trainjob import TRAINJOB_CRD, check_restricted_pod, trainer_pod

MANIFESTS = ROOT / "manifests"
KUBECTL = "/usr/bin/kubectl"
OVERLAYS = ("dev", "prod", "external-s3")
TARGETS = ("base", *OVERLAYS)
NAMESPACE = "m3i"
CRDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
}
RUNTIME_COMPONENT = MANIFESTS / "components" / "trainer-runtime"
CORE_GROUPS = {"", "apps", "batch", "networking.k8s.io", "rbac.authorization.k8s.io", "scheduling.k8s.io", "policy"}
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
STANDARD_LABELS = ("name", "part-of", "component", "version", "managed-by")
METRICS_PORTS = range(9400, 9408)  # launch.metrics_port + local rank, up to 8 ranks a pod
MINIO_OBJECTS = {
    ("Deployment", "m3i-minio"),
    ("Service", "m3i-minio"),
    ("PersistentVolumeClaim", "m3i-minio"),
    ("Job", "m3i-minio-bucket"),
    ("NetworkPolicy", "m3i-minio-ingress"),
    ("NetworkPolicy", "m3i-egress-storage"),
}

# The launcher's Role: exactly these (apiGroup, resource) -> verbs, nothing else.
LAUNCHER_RULES = {
    ("batch.volcano.sh", "jobs"): {"create", "get", "list", "watch", "delete"},
    # torchx's kubernetes scheduler polls a Volcano Job through get_namespaced_custom_object_status.
    ("batch.volcano.sh", "jobs/status"): {"get"},
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete"},
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"get", "list", "watch"},
}

CHECKOV_SKIPS = {
    "CKV_K8S_43": "images are pinned by immutable release tags (MinIO RELEASE.*, Pushgateway v*), "
    "which test_images_are_pinned enforces; digests would need a registry lookup on every bump",
    "CKV_K8S_15": "imagePullPolicy IfNotPresent is deliberate: with pinned tags Always only adds a registry "
    "round trip per pod start and fails starts when the registry is unreachable",
    "CKV_K8S_35": "only the bucket Job reads the Secret through env (mc takes credentials from MC_HOST_* alone; "
    "MinIO reads them as files); test_secret_env_only_in_bucket_job keeps it that way",
}


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize path`` as a list of objects."""
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every target rendered once: ``base`` and each overlay."""
    return {t: kustomize(MANIFESTS / t if t == "base" else MANIFESTS / "overlays" / t) for t in TARGETS}


@pytest.fixture(scope="module")
def with_runtime(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """dev and prod, each with components/trainer-runtime (a component takes the including kustomization's namespace)."""
    out = {}
    for overlay in ("dev", "prod"):
        where = tmp_path_factory.mktemp(f"trainer-runtime-{overlay}")
        rel = os.path.relpath(MANIFESTS, where)
        (where / "kustomization.yaml").write_text(
            f"namespace: {NAMESPACE}\nresources: [{rel}/overlays/{overlay}]\ncomponents: [{rel}/components/trainer-runtime]\n"
        )
        out[overlay] = kustomize(where)
    return out


def validate(o: dict[str, Any]) -> None:
    """Against its CRD in tests/data/crds, or as a core kind with kubernetes-validate."""
    crd = CRDS.get((o["apiVersion"], o["kind"]))
    if crd:
        assert_valid(o, crd)
    else:
        # kubernetes-validate only warns on kinds it does not know: keep CRDs out of this branch.
        group = o["apiVersion"].rpartition("/")[0]
        assert group in CORE_GROUPS, f"{o['apiVersion']} {o['kind']} has no schema in tests/data/crds"
        validate_core(o)


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod template) of every workload."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]
        elif o["kind"] == "CronJob":
            yield f"CronJob/{o['metadata']['name']}", o["spec"]["jobTemplate"]["spec"]["template"]
        elif o["kind"] == "Pod":
            yield f"Pod/{o['metadata']['name']}", o


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def launch_section(objs: list[dict[str, Any]], tmp_path: Path) -> LaunchConfig:
    """The ``m3i-launch`` ConfigMap's ``m3i.yaml`` read the way ``m3i --config`` reads it."""
    cm = one(objs, "ConfigMap", "m3i-launch")
    path = tmp_path / "m3i.yaml"
    path.write_text(cm["data"]["m3i.yaml"])
    return load_config(None, path, []).launch


def check_restricted_container(where: str, c: dict[str, Any], pod_sc: dict[str, Any]) -> None:
    """The container rules of Pod Security "restricted", plus m3i's own (read-only root, resources)."""
    sc = c.get("securityContext", {})
    name = f"{where} container {c['name']}"
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
    for key in ("runAsUser", "runAsGroup"):
        uid = sc.get(key, pod_sc.get(key))
        assert isinstance(uid, int) and uid > 0, f"{name}: numeric non-root {key}"
    assert sc.get("allowPrivilegeEscalation") is False, name
    assert sc.get("privileged", False) is False, name
    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), name
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", name
    assert sc.get("readOnlyRootFilesystem") is True, name
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res.get(part, {})), f"{name}: resources.{part} needs cpu and memory"


# --- rendering and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_target_renders_into_the_namespace(rendered, target):
    objs = rendered[target]
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PriorityClass", "Deployment",
            "Service", "NetworkPolicy", "PodMonitor", "ServiceMonitor"} <= kinds
    for o in objs:
        ns = o["metadata"].get("namespace")
        assert ns == (None if o["kind"] in CLUSTER_SCOPED else NAMESPACE), f"{o['kind']}/{o['metadata']['name']}: {ns}"
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates(rendered, target):
    for o in rendered[target]:
        validate(o)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes(rendered, overlay, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(rendered[overlay], sort_keys=False))
    assert checkov_failures(["-f", str(path)], "kubernetes", CHECKOV_SKIPS) == []


# --- labels, images, pods ----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_standard_labels(rendered, target):
    for o in rendered[target]:
        labels = o["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if f"app.kubernetes.io/{k}" not in labels]
        assert not missing, f"{o['kind']}/{o['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/part-of"] == "m3i" and labels["app.kubernetes.io/managed-by"] == "kustomize"
    for where, tpl in pod_templates(rendered[target]):
        labels = tpl["metadata"]["labels"]
        assert all(f"app.kubernetes.io/{k}" in labels for k in STANDARD_LABELS), where


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(rendered, target):
    for where, tpl in pod_templates(rendered[target]):
        for c in containers(tpl["spec"]):
            image = c["image"]
            tag = image.rpartition("/")[2].partition("@")[0].partition(":")[2]
            assert "@sha256:" in image or tag not in ("", "latest"), f"{where}: {image} is not pinned"
            assert c["imagePullPolicy"] == "IfNotPresent", where


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_restricted(rendered, target):
    templates = list(pod_templates(rendered[target]))
    assert templates
    for where, tpl in templates:
        spec = tpl["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, f"{where}: no pod here calls the API"
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert all("hostPath" not in v for v in spec.get("volumes", [])), where
        for c in containers(spec):
            check_restricted_container(where, c, pod_sc)


def test_minio_and_pushgateway_have_probes(rendered):
    objs = rendered["base"]
    minio = one(objs, "Deployment", "m3i-minio")["spec"]["template"]["spec"]["containers"][0]
    assert minio["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert minio["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert minio["image"].startswith("quay.io/minio/minio:RELEASE.")
    push = one(objs, "Deployment", "m3i-pushgateway")["spec"]["template"]["spec"]["containers"][0]
    assert push["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert push["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert re.fullmatch(r"docker\.io/prom/pushgateway:v\d+\.\d+\.\d+", push["image"])
    svc = one(objs, "Service", "m3i-minio")
    assert svc["spec"]["type"] == "ClusterIP" and [p["port"] for p in svc["spec"]["ports"]] == [9000]


def test_overlays_size_storage(rendered):
    def pvc(target: str) -> str:
        return one(rendered[target], "PersistentVolumeClaim", "m3i-minio")["spec"]["resources"]["requests"]["storage"]

    assert (pvc("dev"), pvc("base"), pvc("prod")) == ("10Gi", "100Gi", "2Ti")


# --- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_values_rendered(rendered, target):
    assert not of_kind(rendered[target], "Secret"), "the S3 Secret is created with kubectl, never rendered"
    for where, tpl in pod_templates(rendered[target]):
        for c in containers(tpl["spec"]):
            for e in c.get("env", []):
                if e["name"] in {*S3_SECRET_KEYS, "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}:
                    assert "value" not in e, f"{where}: {e['name']} has a literal value"
                if e["name"].startswith("MC_HOST_"):  # credentials only as $(VAR) references
                    assert "$(AWS_ACCESS_KEY_ID):$(AWS_SECRET_ACCESS_KEY)@" in e["value"], where


@pytest.mark.parametrize("target", TARGETS)
def test_secret_env_only_in_bucket_job(rendered, target):
    """The reason CKV_K8S_35 is skipped stays true: only mc gets Secret values as env vars."""
    for where, tpl in pod_templates(rendered[target]):
        env = [e for c in containers(tpl["spec"]) for e in c.get("env", [])]
        refs = [e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
        assert not refs or where == "Job/m3i-minio-bucket", f"{where} reads {refs} from a Secret as env"
        for v in tpl["spec"].get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] == "m3i-s3", where


def test_credential_examples_are_placeholders():
    examples = sorted(MANIFESTS.rglob("*.env.example"))
    assert len(examples) == 2
    for path in examples:
        pairs = dict(
            line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
        )
        assert set(pairs) == set(S3_SECRET_KEYS), path
        assert pairs["AWS_ACCESS_KEY_ID"] == pairs["AWS_SECRET_ACCESS_KEY"] == "CHANGE-ME", path
        real = path.with_name(path.name.removesuffix(".example"))
        ignored = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=ROOT)
        assert ignored.returncode == 0, f"{real} (real credentials) must be git-ignored"


# --- RBAC and scheduling -----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_launcher_role_is_least_privilege(rendered, target):
    objs = rendered[target]
    assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")
    (role,) = of_kind(objs, "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"unexpected rule fields {rule}"
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    assert granted == LAUNCHER_RULES
    flat = [x for rule in role["rules"] for v in rule.values() for x in v]
    assert "*" not in flat and "secrets" not in flat

    (binding,) = of_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "m3i-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "m3i-pipeline", "namespace": NAMESPACE}]
    one(objs, "ServiceAccount", "m3i-pipeline")
    train = one(objs, "ServiceAccount", "m3i-train")
    assert train["automountServiceAccountToken"] is False


def test_priority_class(rendered):
    pc = one(rendered["base"], "PriorityClass", "m3i-training")
    # User-defined classes may go up to 1e9; the system ones sit at 2e9 and above.
    assert 0 < pc["value"] < 1_000_000_000
    assert pc["globalDefault"] is False and pc["preemptionPolicy"] in ("PreemptLowerPriority", "Never")


@pytest.mark.parametrize("target", TARGETS)
def test_namespace_enforces_restricted(rendered, target):
    labels = one(rendered[target], "Namespace", NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert re.fullmatch(r"latest|v1\.\d+", labels[f"pod-security.kubernetes.io/{mode}-version"])
    assert labels["pod-security.kubernetes.io/enforce-version"] != "latest", "enforce is pinned"


# --- networking --------------------------------------------------------------------------


def policies(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p["spec"] for p in of_kind(objs, "NetworkPolicy")}


@pytest.mark.parametrize("target", TARGETS)
def test_network_is_default_deny_and_scoped(rendered, target):
    pols = policies(rendered[target])
    deny = pols["m3i-default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, spec in pols.items():
        for rule in spec.get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without 'from' admits every source"
        for rule in spec.get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule without 'to' reaches every destination"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                    assert net.num_addresses <= 16, f"{name}: {net} is wider than an API server's addresses"
        for rule in [*spec.get("ingress", []), *spec.get("egress", [])]:
            assert rule.get("ports"), f"{name}: a rule without ports opens every protocol"
    dns = pols["m3i-egress-dns"]["egress"][0]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"] and {p["port"] for p in dns["ports"]} == {53}


def test_storage_reachable_only_from_the_namespace(rendered):
    pols = policies(rendered["base"])
    ingress = pols["m3i-minio-ingress"]
    assert ingress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "minio",
                                                     "app.kubernetes.io/component": "storage"}
    (rule,) = ingress["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # same namespace only
    assert rule["ports"] == [{"protocol": "TCP", "port": 9000}]
    minio_pod = one(rendered["base"], "Deployment", "m3i-minio")["spec"]["template"]["metadata"]["labels"]
    assert ingress["podSelector"]["matchLabels"].items() <= minio_pod.items()


def test_external_s3_drops_minio(rendered):
    objs = rendered["external-s3"]
    present = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert not present & MINIO_OBJECTS
    assert MINIO_OBJECTS <= {(o["kind"], o["metadata"]["name"]) for o in rendered["base"]}
    egress = policies(objs)["m3i-egress-external-s3"]
    assert egress["podSelector"] == {} and egress["egress"][0]["ports"] == [{"protocol": "TCP", "port": 8333}]


def test_external_s3_component_composes_with_prod(tmp_path):
    """A GPU cluster on Kubeflow's SeaweedFS: prod plus the component, in another namespace."""
    rel = os.path.relpath(MANIFESTS, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"namespace: research\nresources: [{rel}/overlays/prod]\ncomponents: [{rel}/components/external-s3]\n"
    )
    objs = kustomize(tmp_path)
    assert not {(o["kind"], o["metadata"]["name"]) for o in objs} & MINIO_OBJECTS
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED} == {"research"}
    assert "m3i-egress-external-s3" in policies(objs)
    assert "nvidia.com/gpu.present" in one(objs, "ConfigMap", "m3i-launch")["data"]["m3i.yaml"]


def test_apiserver_egress_is_patched_per_overlay(rendered):
    spec = policies(rendered["prod"])["m3i-pipeline-apiserver"]
    # Every pod of a KFP run: Argo's wait container in each step (inline trainer included) talks to the API.
    assert spec["podSelector"] == {"matchExpressions": [{"key": "workflows.argoproj.io/workflow", "operator": "Exists"}]}
    assert spec["policyTypes"] == ["Egress"]
    (rule,) = spec["egress"]
    assert [set(p) for p in rule["to"]] == [{"ipBlock"}] * len(rule["to"])
    assert {p["port"] for p in rule["ports"]} == {443, 6443}
    assert (MANIFESTS / "overlays" / "prod" / "apiserver-egress.yaml").is_file()


# --- monitoring against what m3i.launch renders ------------------------------------------


@pytest.fixture(scope="module")
def prod_launch(rendered, tmp_path_factory) -> LaunchConfig:
    return launch_section(rendered["prod"], tmp_path_factory.mktemp("prod-launch"))


@pytest.mark.parametrize("kind", ["volcano", "pytorchjob"])
def test_monitors_and_policies_fit_the_rendered_training_pods(rendered, prod_launch, kind):
    """Render the prod training job with m3i.launch and check the manifests scrape and admit its pods."""
    cfg = dataclasses.replace(prod_launch, kind=kind)
    job = render(cfg, ["--preset", "default"])
    if job["kind"] == "Job":
        templates = [t["template"] for t in job["spec"]["tasks"]]
    else:
        templates = [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
    assert len(templates) == 2  # two Volcano tasks, or a Master and a Worker

    objs = rendered["prod"]
    pm = one(objs, "PodMonitor", "m3i-train")
    inline = one(objs, "PodMonitor", "m3i-train-inline")
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector == POD_LABELS
    scraped = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert scraped == {"metrics", *(f"metrics-{r}" for r in range(1, 8))}
    pols = policies(objs)
    metrics_port = pols["m3i-train-metrics"]["ingress"][0]["ports"][0]
    assert pols["m3i-train-peers"]["podSelector"]["matchLabels"] == POD_LABELS
    assert pols["m3i-train-metrics"]["podSelector"]["matchLabels"] == POD_LABELS
    assert pols["m3i-train-peers"]["ingress"][0]["ports"] == [{"protocol": "TCP"}]  # rendezvous + NCCL ephemeral
    for tpl in templates:
        assert selector.items() <= tpl["metadata"]["labels"].items()
        (c,) = tpl["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        metric_ports = {n: p for n, p in ports.items() if re.fullmatch(r"metrics(-\d+)?", n)}
        assert len(metric_ports) == cfg.ranks_per_node == 8
        assert set(metric_ports) <= scraped
        assert all(metrics_port["port"] <= p <= metrics_port["endPort"] for p in metric_ports.values())
        # Every rank once, by m3i-train only.
        assert scrape_addresses(pm, tpl) == sorted(f"{POD_IP}:{p}" for p in metric_ports.values())
        assert scrape_addresses(inline, tpl) == []
        # The training pods land in this namespace, so they must pass its "restricted" admission.
        check_restricted_container(f"{kind} pod", c, tpl["spec"]["securityContext"])
        assert tpl["spec"]["serviceAccountName"] == "m3i-train"
        assert tpl["spec"]["priorityClassName"] == one(objs, "PriorityClass", "m3i-training")["metadata"]["name"]
        assert tpl["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tpl["spec"]["tolerations"]
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert refs == {"m3i-s3"}


@pytest.mark.parametrize("target", TARGETS)
def test_inline_podmonitor_scrapes_the_in_pod_train_step(rendered, target):
    """The compiled pipeline's in-pod train step: scraped on every rank port by m3i-train-inline
    alone, and admitted by the metrics policy when it runs in m3i."""
    objs = rendered[target]
    pod = inline_train_pod()
    labels = pod["metadata"]["labels"]
    assert labels["m3i.io/launcher"] == "inline"
    inline = one(objs, "PodMonitor", "m3i-train-inline")
    main = one(objs, "PodMonitor", "m3i-train")
    selected = ("app.kubernetes.io/part-of", "m3i.io/launcher")
    assert inline["spec"]["selector"] == {"matchLabels": {k: labels[k] for k in selected}}
    assert "namespaceSelector" not in inline["spec"]  # its own namespace unless patched (docs/manifests.md)
    assert scrape_addresses(inline, pod) == [f"{POD_IP}:{p}" for p in METRICS_PORTS]
    assert scrape_addresses(main, pod) == []
    assert {"key": "m3i.io/launcher", "operator": "DoesNotExist"} in main["spec"]["selector"]["matchExpressions"]
    for ep in inline["spec"]["podMetricsEndpoints"]:
        assert ep["path"] == "/metrics" and ep["interval"] == main["spec"]["podMetricsEndpoints"][0]["interval"]
        assert not {"port", "portNumber", "targetPort"} & set(ep), "KFP declares no ports: a port filter keeps no target"
    metrics = policies(objs)["m3i-train-metrics"]
    assert selects(metrics["podSelector"], labels)
    (ports,) = metrics["ingress"][0]["ports"]
    assert (ports["port"], ports["endPort"]) == (METRICS_PORTS[0], METRICS_PORTS[-1])


def test_inline_podmonitor_namespace_patch(tmp_path):
    """The patch docs/manifests.md gives for a Kubeflow profile namespace renders and validates."""
    rel = os.path.relpath(MANIFESTS, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/prod]\n"
        "patches:\n"
        "  - target: {kind: PodMonitor, name: m3i-train-inline}\n"
        "    patch: |-\n"
        "      - op: add\n"
        "        path: /spec/namespaceSelector\n"
        "        value: {matchNames: [kubeflow-user-example-com]}\n"
    )
    pm = one(kustomize(tmp_path), "PodMonitor", "m3i-train-inline")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["kubeflow-user-example-com"]}
    assert_valid(pm, CRDS[("monitoring.coreos.com/v1", "PodMonitor")])
    docs = (ROOT / "docs" / "manifests.md").read_text()
    assert "name: m3i-train-inline}" in docs and "path: /spec/namespaceSelector" in docs


def test_servicemonitor_scrapes_the_pushgateway_with_honor_labels(rendered):
    objs = rendered["base"]
    (sm,) = of_kind(objs, "ServiceMonitor")
    svc = one(objs, "Service", "m3i-pushgateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["honorLabels"] is True
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert [p["port"] for p in svc["spec"]["ports"]] == [9091]


# --- launch defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_launch_configmap_parses(rendered, target, tmp_path):
    objs = rendered[target]
    launch = launch_section(objs, tmp_path)
    assert launch.scheduler == "kubernetes" and launch.namespace == NAMESPACE
    assert launch.service_account == "m3i-train" and launch.s3_secret == "m3i-s3"
    one(objs, "ServiceAccount", launch.service_account)
    if launch.priority_class:
        one(objs, "PriorityClass", launch.priority_class)
    if target != "prod":
        assert not launch.node_selector and not launch.tolerations and launch.gpus_per_node == 0


def test_prod_launch_targets_the_gpu_pool(prod_launch):
    assert prod_launch.node_selector == {"nvidia.com/gpu.present": "true"}
    assert prod_launch.tolerations == ("nvidia.com/gpu:NoSchedule",)
    assert prod_launch.gpus_per_node == prod_launch.ranks_per_node == 8 and prod_launch.nproc_per_node == 0  # one rank per GPU
    assert prod_launch.priority_class == "m3i-training"
    assert prod_launch.termination_grace_seconds == 300 and prod_launch.rdma_resource is None  # RDMA off by default


# --- Kubeflow Trainer v2: the optional runtime (components/trainer-runtime) ----------------


def test_trainer_runtime_is_off_by_default(rendered):
    for target in TARGETS:
        assert not of_kind(rendered[target], "TrainingRuntime") and not of_kind(rendered[target], "ClusterTrainingRuntime")


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_trainer_runtime_component_adds_a_valid_runtime(with_runtime, rendered, overlay):
    objs = with_runtime[overlay]
    added = {(o["kind"], o["metadata"]["name"]) for o in objs} - {(o["kind"], o["metadata"]["name"]) for o in rendered[overlay]}
    assert added == {("TrainingRuntime", "m3i-torch")} and len(objs) == len(rendered[overlay]) + 1
    for o in objs:
        validate(o)
    rt = one(objs, "TrainingRuntime", "m3i-torch")
    assert rt["metadata"]["namespace"] == NAMESPACE
    labels = rt["metadata"]["labels"]
    assert all(f"app.kubernetes.io/{k}" in labels for k in STANDARD_LABELS) and labels["app.kubernetes.io/managed-by"] == "kustomize"
    pod = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    check_restricted_pod(pod)
    (c,) = pod["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["imagePullPolicy"] == "IfNotPresent"
    # What it names exists in every overlay.
    one(objs, "ServiceAccount", pod["spec"]["serviceAccountName"])
    one(objs, "PriorityClass", pod["spec"]["priorityClassName"])


def test_trainer_runtimes_equal_the_renderer(with_runtime, prod_launch):
    """manifests/ and m3i.launch.trainjob.render_training_runtime agree (the prod launch defaults)."""
    rt = one(with_runtime["prod"], "TrainingRuntime", "m3i-torch")
    want = render_training_runtime(prod_launch)
    assert rt["spec"] == want["spec"]
    assert want["metadata"]["labels"].items() <= rt["metadata"]["labels"].items()
    assert (rt["metadata"]["name"], rt["metadata"]["namespace"]) == (prod_launch.runtime, prod_launch.namespace)
    # The cluster-scoped variant: applied on its own, not through kustomize (which would namespace it).
    path = RUNTIME_COMPONENT / "cluster-training-runtime.yaml"
    (cluster,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    validate(cluster)
    want = render_training_runtime(prod_launch, cluster=True)
    assert cluster["kind"] == "ClusterTrainingRuntime" and "namespace" not in cluster["metadata"]
    assert cluster["spec"] == want["spec"] and want["metadata"]["labels"].items() <= cluster["metadata"]["labels"].items()
    component = yaml.safe_load((RUNTIME_COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and component["resources"] == ["training-runtime.yaml"]


def test_checkov_passes_with_the_trainer_runtime(with_runtime, tmp_path):
    path = tmp_path / "prod-trainer-runtime.yaml"
    path.write_text(yaml.safe_dump_all(with_runtime["prod"], sort_keys=False))
    assert checkov_failures(["-f", str(path)], "kubernetes", CHECKOV_SKIPS) == []


def test_monitors_and_policies_fit_the_trainjob_pods(with_runtime, prod_launch):
    """A prod TrainJob on the component's runtime: the pod the Trainer makes is scraped, admitted and restricted."""
    objs = with_runtime["prod"]
    cfg = dataclasses.replace(prod_launch, kind="trainjob")
    job = render(cfg, ["--preset", "default"])
    assert_valid(job, TRAINJOB_CRD)
    pod = trainer_pod(one(objs, "TrainingRuntime", cfg.runtime), job)
    validate_core(pod)
    check_restricted_pod(pod)
    labels, spec = pod["metadata"]["labels"], pod["spec"]
    (c,) = spec["containers"]
    pm = one(objs, "PodMonitor", "m3i-train")
    assert selects(pm["spec"]["selector"], labels)
    assert scrape_addresses(pm, pod) == sorted(f"{POD_IP}:{p}" for p in METRICS_PORTS)
    assert scrape_addresses(one(objs, "PodMonitor", "m3i-train-inline"), pod) == []
    pols = policies(objs)
    assert selects(pols["m3i-train-peers"]["podSelector"], labels) and selects(pols["m3i-train-metrics"]["podSelector"], labels)
    assert spec["serviceAccountName"] == "m3i-train" and spec["priorityClassName"] == "m3i-training"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"m3i-s3"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
