"""Hostile values of issue #22 (item 7) against the Helm chart, each test named after its probe.

Before #22 each of these rendered: ``launch.env`` names ``DB_CREDENTIAL`` and ``GITHUB_PAT`` passed
the name check into the ``m3i-launch`` ConfigMap; ``pipeline.hook.schedule.params`` reached the hook
Job's arguments unchecked; ``launch.memory=99999999999999999999999Ti`` rendered (only ``m3i launch``
refused it); ``launch.namespace=kube-system`` and ``namespace.podSecurity=privileged`` passed without
a word. Now the schema or the chart's checks refuse each, and a value says when the user means it.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

import pytest
import yaml

from m3i.config import LaunchConfig, load_config
from m3i.config.launch import _MAX_POD_BYTES, quantity_bytes
from tests.k8s_quantity import UNITS, quantity_at_most
from tests.test_faults_config import SCHEMA
from tests.test_helm import CHART, NAMESPACE, RELEASE, helm, launch_config_file, objects, only


def refused(*args: str, namespace: str = NAMESPACE) -> str:
    """``helm template`` with ``args`` fails; its error text (nothing rendered)."""
    proc = helm("template", RELEASE, str(CHART), "-n", namespace, *args, check=False)
    assert proc.returncode != 0, f"helm template accepted {args}:\n{proc.stdout[-1500:]}"
    assert "kind: ConfigMap" not in proc.stdout
    return proc.stderr


def launch_section(*args: str) -> dict:
    cm = only(objects(*args), "ConfigMap", "m3i-launch")
    return yaml.safe_load(cm["data"]["m3i.yaml"])["launch"]


CREDENTIAL_HINT = "value must be 'a variable that is not a credential: put secrets in the Secret named by storage.existingSecret"
VALUE_HINT = "value must be 'a value that is not a credential: secrets go in a Kubernetes Secret"
PARAM_HINT = "value must be 'a parameter that is not a credential: the hook passes params as plain-text arguments'"


# -- credentials in launch.env and the hook's params ------------------------------------------


def test_helm_launch_env_db_credential_refused():
    err = refused("--set", "launch.env={NCCL_SOCKET_IFNAME=eth0,DB_CREDENTIAL=postgres-pw}")
    assert f"at '/launch/env/1': {CREDENTIAL_HINT}" in err and "/launch/env/0" not in err, err


def test_helm_launch_env_github_pat_refused():
    err = refused("--set", "launch.env={GITHUB_PAT=abc,OMP_NUM_THREADS=8}")
    assert f"at '/launch/env/0': {CREDENTIAL_HINT}" in err and "/launch/env/1" not in err, err


def test_helm_launch_env_credential_shaped_value_refused():
    # The name says nothing, the value is a GitHub token; the error does not repeat it.
    token = "ghp_" + "Ab1" * 12
    err = refused("--set", f"launch.env={{GIT_REMOTE_SETTING={token}}}")
    assert f"at '/launch/env/0': {VALUE_HINT}" in err and token not in err, err


def test_helm_launch_env_names_users_need_still_land_in_the_configmap(tmp_path):
    env = ["PATH=/opt/venv/bin:/usr/bin", "PYTHONPATH=/app", "OMP_NUM_THREADS=8", "AUTHOR=ml-team",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_IB_HCA=mlx5", "AWS_SHARED_CREDENTIALS_FILE=/var/run/aws/credentials",
           "GOOGLE_APPLICATION_CREDENTIALS=/var/run/gcp/key.json"]
    args = ("--set", "launch.env={" + ",".join(env) + "}")
    assert launch_section(*args)["env"] == env
    cfg = load_config(None, launch_config_file(objects(*args), tmp_path), []).launch
    assert cfg.env == tuple(env)


def test_helm_schedule_param_aws_secret_refused():
    err = refused("--set", "pipeline.hook.enabled=true,pipeline.hook.schedule.params.aws_secret=x,"
                  "pipeline.hook.schedule.params.steps=1000")
    assert "invalid propertyName 'aws_secret'" in err and PARAM_HINT in err, err
    assert "'steps'" not in err


def test_helm_schedule_param_value_like_a_key_refused():
    err = refused("--set", "pipeline.hook.enabled=true,pipeline.hook.schedule.params.data=AKIAIOSFODNN7EXAMPLE,"
                  "pipeline.hook.schedule.params.shards=s3://m3i/data/train")
    assert f"at '/pipeline/hook/schedule/params/data': {VALUE_HINT}" in err and "params/shards" not in err, err
    assert "AKIAIOSFODNN7EXAMPLE" not in err


def test_helm_schedule_plain_params_reach_the_hook():
    args = ("--set", "pipeline.hook.enabled=true,pipeline.hook.schedule.params.steps=1000,"
            "pipeline.hook.schedule.params.shards=s3://m3i/data/train,pipeline.hook.schedule.params.dry=true")
    job = only(objects(*args), "Job", f"{RELEASE}-pipeline-hook")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][-6:] == ["--param", "dry=true", "--param", "shards=s3://m3i/data/train", "--param", "steps=1000"]


@pytest.mark.parametrize("value", ["storage.external.endpoint=https://admin:hunter2@s3.example.com",
                                   "pipeline.hook.kfp.host=http://user:pw@ml-pipeline.kubeflow:8888"])
def test_helm_url_with_a_password_refused(value):
    assert VALUE_HINT in refused("--set", value)


# -- resource bounds as m3i launch has them ----------------------------------------------------


def test_helm_launch_memory_99999999999999999999999Ti_refused():
    err = refused("--set", "launch.memory=99999999999999999999999Ti")
    assert "at '/launch/memory': value must be 'a quantity of at most 1Pi (2^50 bytes, the bound of m3i launch)" in err, err


@pytest.mark.parametrize("value", ["1025Ti", "1.0001Pi", "1125899906842625", "2Ei", "1126T"])
def test_helm_launch_memory_and_shm_above_1pi_refused(value):
    for key in ("memory", "shmSize"):
        err = refused("--set-string", f"launch.{key}={value}")
        assert f"at '/launch/{key}': value must be 'a quantity of at most 1Pi" in err, err
    for field in ("memory", "shm_size"):
        with pytest.raises(ValueError, match=rf"launch\.{field}={value!r} is above 1Pi"):
            LaunchConfig(**{field: value})


def test_helm_launch_memory_syntax_is_m3i_launch_syntax():
    # Kubernetes reads 500m as half a byte; m3i launch refuses it, so the chart does too.
    assert "'500m' does not match pattern" in refused("--set", "launch.memory=500m")
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        LaunchConfig(memory="500m")


def test_helm_launch_shm_not_below_memory_refused():
    err = refused("--set", "launch.memory=64Gi,launch.shmSize=64Gi")
    assert "launch.shmSize=64Gi must be below launch.memory=64Gi: /dev/shm counts against the pod's memory" in err
    # A null value is m3i's default, which the chart names as LaunchConfig does.
    assert (LaunchConfig().memory, LaunchConfig().shm_size) == ("16Gi", "4Gi")
    assert "launch.shmSize=null must be below launch.memory=4Gi" in refused("--set", "launch.memory=4Gi")
    assert "launch.shmSize=32Gi must be below launch.memory=null" in refused("--set", "launch.shmSize=32Gi")
    assert launch_section("--set", "launch.memory=4.5Gi")["memory"] == "4.5Gi"


def test_helm_launch_cpu_above_4096_refused():
    assert "at '/launch/cpu': maximum: got 4,097, want 4,096" in refused("--set", "launch.cpu=4097")


def test_helm_memory_bound_pattern_is_built_from_m3i_launch_bound():
    podmem = SCHEMA["definitions"]["podMemory"]
    assert podmem["if"]["not"]["pattern"] == quantity_at_most(_MAX_POD_BYTES) and _MAX_POD_BYTES == 2**50


def _boundary_samples() -> list[str]:
    out = []
    for unit, mult in UNITS.items():
        at = Decimal(_MAX_POD_BYTES) / Decimal(mult)  # exact: every multiplier divides into a finite decimal
        step = Decimal(1).scaleb(at.as_tuple().exponent) if at != at.to_integral() else Decimal(1)
        for value in (at, at - step, at + step, at * 2, at / 2, at.to_integral(), Decimal(0)):
            if value >= 0:
                out.append(f"{value.normalize():f}{unit}")
    rng = random.Random(22)
    for _ in range(400):
        unit = rng.choice(list(UNITS))
        out.append(f"{rng.randint(0, 10 ** rng.randint(0, 22))}{unit}")
        out.append(f"{rng.randint(0, 10 ** rng.randint(0, 6))}.{rng.randint(0, 999)}{unit}")
    return out


def test_helm_memory_bound_agrees_with_m3i_launch():
    """The chart's pattern and quantity_bytes agree on every boundary of every unit and on random quantities."""
    pattern = re.compile(quantity_at_most(_MAX_POD_BYTES))
    samples = _boundary_samples()
    assert {"1Pi", "1024Ti", "1125899906842624", "1125899906842625", "0.0009765625Ei"} <= set(samples)
    for q in samples:
        assert bool(pattern.match(q)) is (quantity_bytes(q) <= _MAX_POD_BYTES), q


# -- system namespaces and privileged pods -----------------------------------------------------


@pytest.mark.parametrize("ns", ["kube-system", "kube-public", "kube-node-lease"])
def test_helm_launch_namespace_kube_system_refused(ns):
    err = refused("--set", f"launch.namespace={ns}")
    assert (f"the training namespace (launch.namespace, or the release namespace) is {ns}, a Kubernetes system namespace "
            "(kube-*): pick a namespace of your own, or set namespace.allowSystem=true") in err, err


def test_helm_release_in_kube_system_refused():
    err = refused(namespace="kube-system")
    assert "the release namespace (helm -n) is kube-system, a Kubernetes system namespace" in err, err


def test_helm_system_namespace_renders_when_allowed():
    assert launch_section("--set", "launch.namespace=kube-system,namespace.allowSystem=true")["namespace"] == "kube-system"
    # default is the users' namespace in Kubernetes, not a system one: it needs no opt-in.
    assert launch_section("--set", "launch.namespace=default")["namespace"] == "default"


def test_helm_namespace_pod_security_privileged_refused():
    err = refused("--set", "namespace.create=true,namespace.podSecurity=privileged")
    assert ("namespace.podSecurity=privileged lets every pod of the namespace run privileged (host namespaces, any "
            "capability, host paths): set namespace.allowPrivileged=true to say you mean it") in err, err
    ns = only(objects("--set", "namespace.create=true,namespace.podSecurity=privileged,namespace.allowPrivileged=true"),
              "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    # The opt-in alone changes nothing: the namespace stays restricted.
    ns = only(objects("--set", "namespace.create=true,namespace.allowPrivileged=true"), "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("create", ["true", "false"])
def test_helm_rdma_needs_the_privileged_opt_in(create):
    """RDMA's IPC_LOCK needs a privileged namespace, so it needs the same explicit opt-in wherever that namespace is."""
    err = refused("--set", f"namespace.create={create},launch.rdmaResource=rdma/ib")
    assert ('launch.rdmaResource=rdma/ib adds capability IPC_LOCK, which only a namespace enforcing Pod Security '
            '"privileged" admits: set namespace.allowPrivileged=true') in err, err
    ok = "launch.rdmaResource=rdma/ib,namespace.allowPrivileged=true"
    if create == "true":
        ok += ",namespace.podSecurity=privileged"
    assert launch_section("--set", f"namespace.create={create},{ok}")["rdma_resource"] == "rdma/ib"
