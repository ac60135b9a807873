"""Faults of issue #14 in the config and the Helm chart, each reproduced, each named after its fault.

1. A malformed YAML config (``--config``, a preset, ``--set`` values) exits 2 with one line
   that names the file, the line and column and what was expected; no traceback.
2. Non-finite floats pass no float field; floats pass no int field; counts, sizes and rates
   have upper bounds.
3. The chart's ``launch.env`` refuses credential-like names (and, since #22, credential-shaped values),
   pointing at the S3 Secret value,
   and every label map of the chart takes only valid Kubernetes label keys and values; the
   Python side (``launch.env``, ``launch.node_selector``) applies the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing

import pytest

from m3i.cli import main
from m3i.config import Config, LaunchConfig, list_presets, load_config
from m3i.config.core import MAX_COUNT, from_dict, read_yaml_sections
from m3i.config.launch import CREDENTIAL_ENV_NAME, _is_label_key, _is_label_value
from tests.test_helm import CHART, NAMESPACE, RELEASE, helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"m3i {command}: error: "), lines[0]
    return lines[0]


# -- 1. malformed YAML ------------------------------------------------------------------------

# (file text, the location and words the one line must carry)
MALFORMED = {
    "syntax": ("train:\n  lr: [1, 2\n  steps: 3\n", ["line 3, column 8", "expected ',' or ']'"]),
    "tab": ("train:\n\tlr: 0.1\n", ["line 2, column 1", "tab", "expected spaces"]),
    "top-level list": ("- train\n- data\n", ["line 1, column 1", "must be a mapping of sections"]),
    "top-level scalar": ("just text\n", ["line 1, column 1", "must be a mapping of sections"]),
    "section not a mapping": ("data:\n  batch_size: 8\ntrain: 3\n", ["line 3, column 8", "section 'train'", "expected a mapping"]),
    "empty section": ("train:\ndata:\n  batch_size: 8\n", ["line 1, column 7", "section 'train' is empty", "expected a mapping"]),
    "non-string key": ("train:\n  1: 2\n", ["line 2, column 3", "key '1' is the int", "expected a name"]),
    "bool key": ("train:\n  yes: 2\n", ["line 2, column 3", "key 'yes' is the bool", "expected a name"]),
    "duplicate key": ("train:\n  lr: 0.1\n  lr: 0.2\n", ["line 3, column 3", "'lr' is given twice", "first at line 2"]),
    "second document": ("train: {lr: 0.1}\n---\ndata: {}\n", ["line 2, column 1", "second document"]),
    "bad date": ("train:\n  run_id: 2024-13-45\n", ["line 2, column 11", "timestamp", "quote it"]),
    "bad indentation": ("train:\n  lr: 0.1\n steps: 3\n", ["line 3, column 2", "expected <block end>"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_yaml_config_exits_2_with_one_line(case, tmp_path, capsys):
    text, needles = MALFORMED[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["train", "--config", str(bad)]) == 2
    line = _one_error_line(capsys, "train")
    assert str(bad) in line
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize(
    "command",
    [["launch", "--dryrun"], ["shard"], ["export"], ["evaluate"]],
    ids=lambda c: c[0],
)
def test_malformed_yaml_config_exits_2_on_every_subcommand(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MALFORMED["syntax"][0])
    assert main([*command, "--config", str(bad)]) == 2
    assert f"{bad}: line 3, column 8: " in _one_error_line(capsys, command[0])


def test_malformed_yaml_config_not_utf8_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  run_id: caf\xe9\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: byte 20 is not UTF-8 text" in _one_error_line(capsys, "train")


def test_malformed_yaml_preset_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import m3i.config

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "broken.yaml").write_text("model:\n  backbone: [vit\n")
    monkeypatch.setattr(m3i.config, "resources", types.SimpleNamespace(files=lambda _package: tmp_path))
    assert main(["train", "--preset", "broken"]) == 2
    line = _one_error_line(capsys, "train")
    assert "preset broken (m3i/presets/broken.yaml): line 3, column 1: expected ',' or ']'" in line, line


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.steps=.inf", "config.train.steps=inf is not an integer"),
        ("shard.labelled=[a, b", "--set 'shard.labelled=[a, b': the value is not valid YAML: line 1, column 21: expected ',' or ']'"),
        ('train.output="runs/x', "the value is not valid YAML: line 1, column 21: found unexpected end of stream"),
        ("train={1: 2}", "config.train: key 1 is not a string; allowed keys are"),
        ("train.lr=" + "[" * 1200, "the value is not valid YAML: nested too deeply"),
    ],
    ids=["inf-int", "unclosed-list", "unclosed-quote", "int-key", "deep"],
)
def test_set_value_that_fails_to_parse_exits_2_with_one_line(override, needle, capsys):
    assert main(["train", "--set", override]) == 2
    assert needle in _one_error_line(capsys, "train")


def test_set_value_that_is_plain_text_stays_text():
    # Only values that start as YAML (a list, mapping or quoted string) must parse.
    assert load_config(None, None, ["train.run_id=@nightly: 3"]).train.run_id == "@nightly: 3"


def test_yaml_anchors_and_empty_files_still_load():
    assert read_yaml_sections("", "f") == {} and read_yaml_sections("# nothing\n~\n", "f") == {}
    text = "data: &d {batch_size: 8}\nevaluate:\n  batch_size: 8\n"
    assert read_yaml_sections(text, "f") == {"data": {"batch_size": 8}, "evaluate": {"batch_size": 8}}


# -- 2. non-finite and absurd numbers ---------------------------------------------------------


def _fields(kinds: tuple[type, ...]) -> list[tuple[str, str, bool]]:
    """(section, field, is_tuple) of every field of every section whose type (or item type) is in ``kinds``."""
    out = []
    for sec, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
            if tp in kinds or (typing.get_origin(tp) in (typing.Union, types.UnionType) and args[0] in kinds):
                out.append((sec, f.name, False))
            elif typing.get_origin(tp) is tuple and args and args[0] in kinds:
                out.append((sec, f.name, True))
    return out


FLOAT_FIELDS = _fields((float,))
INT_FIELDS = _fields((int,))


def test_every_section_has_float_and_int_fields_to_check():
    assert len(FLOAT_FIELDS) > 30 and len(INT_FIELDS) > 40  # the walk found the fields
    assert ("train", "lr", False) in FLOAT_FIELDS and ("train", "betas", True) in FLOAT_FIELDS
    assert ("train", "steps", False) in INT_FIELDS and ("shard", "resize", False) in INT_FIELDS


@pytest.mark.parametrize("section, name, is_tuple", FLOAT_FIELDS, ids=[f"{s}.{n}" for s, n, _ in FLOAT_FIELDS])
def test_non_finite_float_rejected_for_every_float_field(section, name, is_tuple):
    for raw in (".inf", "-.inf", ".nan", "1e999"):
        value = f"[{raw}, {raw}]" if is_tuple else raw
        with pytest.raises(ValueError, match=rf"{section}\.{name}=\S+ is not a finite number"):
            load_config(None, None, [f"{section}.{name}={value}"])


def test_non_finite_float_rejected_when_built_directly():
    from m3i.config import TrainConfig

    with pytest.raises(ValueError, match=r"train\.lr=inf is not a finite number"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"train\.grad_clip=nan is not a finite number"):
        TrainConfig(grad_clip=float("nan"))


@pytest.mark.parametrize("section, name, is_tuple", INT_FIELDS, ids=[f"{s}.{n}" for s, n, _ in INT_FIELDS])
def test_float_for_int_field_rejected(section, name, is_tuple):
    for raw, shown in (("1e30", "'1e30'"), ("1.0e+30", "1e+30"), ("10.0", "10.0"), (".inf", "inf")):
        with pytest.raises(ValueError, match=rf"{section}\.{name}={re.escape(shown)} is not an integer"):
            load_config(None, None, [f"{section}.{name}={raw}"])
    with pytest.raises(ValueError, match=rf"{section}\.{name}={2**63} is out of range"):
        load_config(None, None, [f"{section}.{name}={2**63}"])


# The count, rate and size fields of the issue: the first value past the bound is refused.
ABSURD = {
    "train.steps": 2**31,
    "train.warmup_steps": 2**31,
    "train.grad_accum": 2**31,
    "train.log_every": 2**31,
    "train.lr": 11.0,
    "checkpoint.interval_steps": 2**31,
    "checkpoint.keep_last": 2**31,
    "metrics.interval_steps": 2**31,
    "data.batch_size": 2**20 + 1,
    "data.image_size": 4097,
    "data.shuffle_buffer": 2**24 + 1,
    "shard.resize": 8193,
    "shard.workers": 1025,
    "shard.max_samples_per_shard": 2**31,
    "shard.max_bytes_per_shard": 2**40 + 1,
    "model.proj_dim": 2**16 + 4,
    "model.embed_dim": 2**16 + 1,
    "model.text_width": 2**16 + 8,
    "model.num_classes": 2**24 + 1,
    "evaluate.batch_size": 2**20 + 1,
    "evaluate.probe_batch_size": 2**20 + 1,
    "evaluate.probe_epochs": 2**31,
    "evaluate.finetune_lr": 11.0,
    "launch.cpu": 4097.0,
}


@pytest.mark.parametrize("key", ABSURD)
def test_absurd_count_rate_or_size_rejected(key):
    with pytest.raises(ValueError, match=rf"{re.escape(key)}={ABSURD[key]!r} is out of range; allowed [\[(]"):
        load_config(None, None, [f"{key}={ABSURD[key]}"])


def test_absurd_pod_memory_rejected():
    with pytest.raises(ValueError, match=r"launch\.memory='99999Pi' is above 1Pi"):
        load_config(None, None, ["launch.memory=99999Pi"])


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_still_passes_the_bounds(preset):
    cfg = load_config(preset)
    assert 1 <= cfg.train.steps <= MAX_COUNT


# -- 3. credentials and labels: the Helm chart and launch config -------------------------------

CREDENTIAL_NAMES = [
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "aws_secret_access_key", "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD", "MINIO_SECRET_KEY", "HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD", "CLIENT_SECRET_FILE_VALUE",
    "KFP_TOKEN", "REDIS_PASS", "GITHUB_APIKEY", "KEY",
    # issue #22: the wider rule
    "DB_CREDENTIAL", "AZURE_CREDENTIALS", "GITHUB_PAT", "PAT", "BASIC_AUTH", "AUTH", "OAUTH_CLIENT", "HTTP_AUTHORIZATION",
    "BEARER", "TLS_PRIVATE_KEY", "GPG_PRIVATE", "SSH_PRIVATEKEY", "GPG_PASSPHRASE", "SMTP_PASSWD", "HFTOKEN",
    "SESSION_COOKIE", "aws_secret", "github_pat",
]
PLAIN_NAMES = [
    "NCCL_SOCKET_IFNAME", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "NCCL_IB_HCA", "PYTHONHASHSEED", "KEYBOARD",
    "GOOGLE_APPLICATION_CREDENTIALS", "AWS_REGION",
    # what users need beside the wider rule (PAT, PASS, AUTH are whole words; a name ending in _FILE/_PATH/_DIR
    # points at a file)
    "PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "PWD", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
    "AUTHOR", "AUTHORS", "PATTERN", "COMPASS_MODE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "MINIO_ROOT_PASSWORD_FILE", "SSH_KEY_PATH", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "HF_HOME",
]
CREDENTIAL_VALUES = [
    "AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A", "ghp_" + "a1B2" * 9, "github_pat_" + "A1b2_" * 6, "glpat-" + "x" * 20,
    "hf_" + "AbCd" * 9, "xoxb-1234567890-abcdefghij", "sk-" + "a" * 48, "sk-ant-api03-" + "b" * 40, "AIza" + "c" * 35,
    "-----BEGIN RSA PRIVATE KEY-----", "-----BEGIN OPENSSH PRIVATE KEY-----",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig", "postgresql://user:hunter2@db:5432/x", "redis://:pw@cache:6379",
    "https://oauth2:tok@gitlab.example.com/a.git", "key=AKIAIOSFODNN7EXAMPLE,other",
]
PLAIN_VALUES = [
    "eth0", "mlx5_0:1", "false", "100000", "0.1", "s3://m3i/data/train", "https://minio.m3i:9000", "git@github.com:a/b",
    "http://ml-pipeline.kubeflow:8888/x@y", "task-" + "a" * 30, "dask-worker-" + "b" * 30, "AKIA", "a" * 40,
    "sha256:" + "f" * 64, "/var/run/gcp/key.json", "AKIAIOSFODNN7EXAMPLE0",
]
ENV_ITEMS = SCHEMA["properties"]["launch"]["properties"]["env"]["items"]
NAME_RULE, VALUE_REF = ENV_ITEMS["allOf"]
VALUE_RULE = SCHEMA["definitions"]["notCredentialValue"]
PARAMS = SCHEMA["properties"]["pipeline"]["properties"]["hook"]["properties"]["schedule"]["properties"]["params"]


def _schema_refuses_env(item: str) -> bool:
    """The chart's launch.env item rule, run by Python's re (RE2 reads these patterns alike)."""
    credential_name, file_name = (p.get("pattern") or p["not"]["pattern"] for p in NAME_RULE["if"]["allOf"])
    by_name = bool(re.search(credential_name, item)) and not re.search(file_name, item)
    return by_name or bool(re.search(VALUE_RULE["if"]["pattern"], item))


def test_credential_env_pattern_is_the_same_in_the_chart_and_launch_config():
    from m3i.config.credentials import CREDENTIAL_FILE_ENV_NAME, CREDENTIAL_VALUE

    assert NAME_RULE["if"]["allOf"] == [
        {"pattern": f"(?i)^({CREDENTIAL_ENV_NAME})="}, {"not": {"pattern": f"(?i)^({CREDENTIAL_FILE_ENV_NAME})="}}]
    assert "storage.existingSecret" in NAME_RULE["then"]["const"]
    assert VALUE_REF == {"$ref": "#/definitions/notCredentialValue"}
    assert VALUE_RULE["if"] == {"type": "string", "pattern": CREDENTIAL_VALUE}
    # The hook's params: the same name rule (matched whole) and the same value rule.
    assert PARAMS["propertyNames"]["if"]["allOf"] == [
        {"pattern": f"(?i)^({CREDENTIAL_ENV_NAME})$"}, {"not": {"pattern": f"(?i)^({CREDENTIAL_FILE_ENV_NAME})$"}}]
    assert PARAMS["additionalProperties"]["allOf"] == [VALUE_REF]


@pytest.mark.parametrize("name", CREDENTIAL_NAMES + PLAIN_NAMES)
def test_credential_env_rejected_by_launch_config(name):
    # The chart's schema rule, run by Python's re, agrees with LaunchConfig on every name.
    credential = name in CREDENTIAL_NAMES
    assert _schema_refuses_env(f"{name}=x") is credential
    if credential:
        with pytest.raises(ValueError, match=rf"launch\.env sets {name}; credentials come only from the Secret"):
            from_dict(LaunchConfig, {"env": [f"{name}=x"]}, section="launch")
    else:
        assert from_dict(LaunchConfig, {"env": [f"{name}=x"]}, section="launch").env_dict() == {name: "x"}


@pytest.mark.parametrize("value", CREDENTIAL_VALUES + PLAIN_VALUES)
def test_credential_shaped_env_value_rejected_by_launch_config(value):
    credential = value in CREDENTIAL_VALUES
    assert _schema_refuses_env(f"SETTING={value}") is credential
    if credential:
        with pytest.raises(ValueError, match=r"launch\.env sets SETTING to a value shaped like a credential") as e:
            from_dict(LaunchConfig, {"env": [f"SETTING={value}"]}, section="launch")
        assert value not in str(e.value)  # the message never repeats the secret
    else:
        assert from_dict(LaunchConfig, {"env": [f"SETTING={value}"]}, section="launch").env_dict() == {"SETTING": value}


LABEL_DEFS = SCHEMA["definitions"]
LABEL_CASES = [  # (key, value, valid)
    ("team", "ml-platform", True),
    ("example.com/team", "a.b_c-1", True),
    ("app.kubernetes.io/name", "", True),
    ("team", "-bad", False),
    ("team", "bad-", False),
    ("team", "has space", False),
    ("team", "x" * 64, False),
    ("Bad Key", "x", False),
    ("a/b/c", "x", False),
    ("Example.com/team", "x", False),
    ("example.com/" + "n" * 64, "x", False),
    ("e" * 254 + "/team", "x", False),
]


def _schema_accepts(key: str, value: str) -> bool:
    key_ok = all(re.search(p["pattern"], key) for p in LABEL_DEFS["labelKey"]["allOf"])
    val = LABEL_DEFS["labelValue"]
    return key_ok and len(value) <= val["maxLength"] and bool(re.search(val["pattern"], value))


@pytest.mark.parametrize("key, value, valid", LABEL_CASES)
def test_label_syntax_is_the_same_in_the_chart_and_launch_config(key, value, valid):
    assert _schema_accepts(key, value) is valid
    assert (_is_label_key(key) and _is_label_value(value)) is valid
    if not valid:
        with pytest.raises(ValueError, match=r"launch\.node_selector has .* not a valid label key and value"):
            from_dict(LaunchConfig, {"node_selector": {key: value}}, section="launch")


def test_helm_credential_env_and_bad_labels_fail_with_schema_errors():
    bad = [
        "launch.env={NCCL_SOCKET_IFNAME=eth0,AWS_SECRET_ACCESS_KEY=abc,MINIO_ROOT_PASSWORD=x}",
        "commonLabels.team=-bad-",
        "commonLabels.Bad Key=x",
        f"dashboard.labels.grafana_dashboard={'1' * 64}",
        "monitoring.labels.release=kube prometheus",
        "launch.nodeSelector.pool=gpu pool",
        "storage.minio.nodeSelector.a/b/c=x",
        "networkPolicy.dns.podLabels.k8s-app=kube dns",
        "networkPolicy.pipelinePods.podSelector.matchLabels.tier=-x",
        "monitoring.rules.labels.bad-name=x",
        "serviceAccounts.train.annotations.a/b/c=x",
    ]
    args = [a for item in bad for a in ("--set", item)]
    proc = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args, check=False)
    err = proc.stderr
    assert proc.returncode != 0 and "don't meet the specifications of the schema" in err, err
    secret_hint = "value must be 'a variable that is not a credential: put secrets in the Secret named by storage.existingSecret"
    assert f"at '/launch/env/1': {secret_hint}" in err and f"at '/launch/env/2': {secret_hint}" in err
    assert "/launch/env/0" not in err
    for needle in (
        "at '/commonLabels/team': '-bad-' does not match pattern",
        "invalid propertyName 'Bad Key'",
        "at '/dashboard/labels/grafana_dashboard': maxLength: got 64, want 63",
        "at '/monitoring/labels/release': 'kube prometheus' does not match pattern",
        "at '/launch/nodeSelector/pool': 'gpu pool' does not match pattern",
        "invalid propertyName 'a/b/c'",
        "at '/networkPolicy/dns/podLabels/k8s-app': 'kube dns' does not match pattern",
        "at '/networkPolicy/pipelinePods/podSelector/matchLabels/tier': '-x' does not match pattern",
        "invalid propertyName 'bad-name'",
    ):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Secret" not in proc.stdout  # nothing rendered


def test_helm_plain_env_and_valid_labels_still_lint():
    good = [
        "launch.env={NCCL_SOCKET_IFNAME=eth0,TOKENIZERS_PARALLELISM=false,GOOGLE_APPLICATION_CREDENTIALS=/var/run/gcp/key.json}",
        "commonLabels.example\\.com/team=ml-platform,commonLabels.cost-center=",
        "launch.nodeSelector.cloud\\.google\\.com/gke-accelerator=nvidia-h100-80gb",
        "monitoring.rules.labels.team=ML platform",
    ]
    out = helm("lint", "--strict", str(CHART), "-n", NAMESPACE, *[a for g in good for a in ("--set", g)]).stdout
    assert "0 chart(s) failed" in out
