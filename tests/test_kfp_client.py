"""m3i.pipeline.kfp_client and `m3i pipeline upload|run|schedule|params`, against an in-memory kfp.Client.

The fake keeps pipelines, versions, experiments and recurring runs like the KFP API server
does, checks every call against the real ``kfp.Client`` method's signature, and answers with
objects shaped like the ``kfp_server_api`` responses. Nothing reaches a network.
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
from types import SimpleNamespace
from typing import Any

import kfp
import kfp_server_api
import pytest
import yaml

from m3i import __version__
from m3i.cli import main
from m3i.pipeline import PIPELINE_NAME
from m3i.pipeline.build import packaged_pipeline, pipeline_sha256, version_name
from m3i.pipeline.kfp_client import (
    Uploaded,
    check_params,
    connect,
    latest_version,
    normalize_cron,
    parse_params,
    pipeline_parameters,
    schedule,
    start_run,
    upload,
)

TOKEN = "kfp-token-Zm9vYmFyIHNlY3JldA"
KFP_CLIENT = kfp.Client  # the real class, whose signatures the fake checks its calls against (tests replace kfp.Client)
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def fixed_revision(monkeypatch):
    """Version names from a known revision, not from this checkout's git state."""
    monkeypatch.setenv("M3I_CODE_REVISION", REVISION)
    for name in ("KFP_HOST", "KFP_NAMESPACE", "KFP_TOKEN", "KFP_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def _predicates(filter_: str | None) -> dict[str, str]:
    """``{key: value}`` of a KFP filter's EQUALS predicates (either spelling of the value field)."""
    if not filter_:
        return {}
    out = {}
    for p in json.loads(filter_)["predicates"]:
        assert p["operation"] == "EQUALS"
        out[p["key"]] = p.get("string_value", p.get("stringValue"))
    return out


class FakeKfp:
    """``kfp.Client`` in memory. ``calls`` holds ``(method, arguments)`` with defaults filled in."""

    def __init__(self, namespace: str = "team-ml", **kw: Any) -> None:
        self.init_kw = kw
        self._context_setting = {"namespace": namespace}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1)
        self.pipelines: dict[str, str] = {}  # name -> id
        self.versions: dict[str, list[SimpleNamespace]] = {}  # pipeline id -> versions, oldest first
        self.experiments: dict[str, SimpleNamespace] = {}
        self.recurring: list[SimpleNamespace] = []
        # What kfp.Client builds from kfp_server_api's RecurringRunServiceApi.
        self.recurring_runs = SimpleNamespace(recurring_run_service_create_recurring_run=self._create_recurring_run)

    def _record(self, method: str, *args: Any, **kw: Any) -> dict[str, Any]:
        bound = inspect.signature(getattr(KFP_CLIENT, method)).bind(self, *args, **kw)
        bound.apply_defaults()
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        self.calls.append((method, arguments))
        return arguments

    def called(self, method: str) -> list[dict[str, Any]]:
        return [a for m, a in self.calls if m == method]

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # pipelines and versions
    def get_pipeline_id(self, *args: Any, **kw: Any) -> str | None:
        a = self._record("get_pipeline_id", *args, **kw)
        return self.pipelines.get(a["name"])

    def _add_version(self, pipeline_id: str, name: str) -> SimpleNamespace:
        v = SimpleNamespace(pipeline_id=pipeline_id, pipeline_version_id=self._id("ver"), display_name=name)
        self.versions[pipeline_id].append(v)
        return v

    def upload_pipeline(self, *args: Any, **kw: Any) -> SimpleNamespace:
        a = self._record("upload_pipeline", *args, **kw)
        assert a["pipeline_name"] not in self.pipelines, "KFP refuses a second pipeline of the same name"
        pid = self.pipelines[a["pipeline_name"]] = self._id("pl")
        self.versions[pid] = []
        self._add_version(pid, a["pipeline_name"])  # KFP's first version carries the pipeline's name
        return SimpleNamespace(pipeline_id=pid, display_name=a["pipeline_name"], namespace=a["namespace"])

    def upload_pipeline_version(self, *args: Any, **kw: Any) -> SimpleNamespace:
        a = self._record("upload_pipeline_version", *args, **kw)
        assert all(v.display_name != a["pipeline_version_name"] for v in self.versions[a["pipeline_id"]]), "duplicate version name"
        return self._add_version(a["pipeline_id"], a["pipeline_version_name"])

    def list_pipeline_versions(self, *args: Any, **kw: Any) -> SimpleNamespace:
        a = self._record("list_pipeline_versions", *args, **kw)
        found = list(self.versions[a["pipeline_id"]])
        want = _predicates(a["filter"])
        found = [v for v in found if all(getattr(v, k) == val for k, val in want.items())]
        if a["sort_by"] == "created_at desc":
            found.reverse()
        else:
            assert a["sort_by"] == "", a["sort_by"]
        return SimpleNamespace(pipeline_versions=found[: a["page_size"]] or None, total_size=len(found), next_page_token="")

    # experiments and runs
    def create_experiment(self, *args: Any, **kw: Any) -> SimpleNamespace:
        a = self._record("create_experiment", *args, **kw)
        key = (a["name"], a["namespace"])
        if key not in self.experiments:  # kfp.Client returns the existing experiment of that name
            self.experiments[key] = SimpleNamespace(experiment_id=self._id("exp"), display_name=a["name"], namespace=a["namespace"])
        return self.experiments[key]

    def run_pipeline(self, *args: Any, **kw: Any) -> SimpleNamespace:
        self._record("run_pipeline", *args, **kw)
        return SimpleNamespace(run_id=self._id("run"))

    # recurring runs
    def list_recurring_runs(self, *args: Any, **kw: Any) -> SimpleNamespace:
        a = self._record("list_recurring_runs", *args, **kw)
        want = _predicates(a["filter"])
        found = [
            r for r in self.recurring
            if (a["experiment_id"] is None or r.experiment_id == a["experiment_id"]) and all(getattr(r, k) == v for k, v in want.items())
        ]
        return SimpleNamespace(recurring_runs=found[: a["page_size"]] or None, total_size=len(found))

    def delete_recurring_run(self, *args: Any, **kw: Any) -> dict:
        a = self._record("delete_recurring_run", *args, **kw)
        self.recurring = [r for r in self.recurring if r.recurring_run_id != a["recurring_run_id"]]
        return {}

    def _create_recurring_run(self, *args: Any, **kw: Any) -> SimpleNamespace:
        api = kfp_server_api.RecurringRunServiceApi.recurring_run_service_create_recurring_run
        bound = inspect.signature(api).bind(None, *args, **kw)
        body = bound.arguments["recurring_run"]
        self.calls.append(("create_recurring_run", {"recurring_run": body}))
        rr = SimpleNamespace(recurring_run_id=self._id("rr"), display_name=body.display_name, experiment_id=body.experiment_id)
        self.recurring.append(rr)
        return rr


def with_versions(*names: str, namespace: str = "team-ml") -> FakeKfp:
    """A client whose KFP already has m3i-pretrain with these versions, oldest first."""
    c = FakeKfp(namespace)
    pid = c.pipelines[PIPELINE_NAME] = c._id("pl")
    c.versions[pid] = []
    for n in names:
        c._add_version(pid, n)
    return c


@pytest.fixture(scope="module")
def packaged_params() -> dict[str, Any]:
    """The packaged pipeline's parameters, parsed once (the YAML takes a while to load)."""
    return pipeline_parameters()


@pytest.fixture
def kfp_factory(monkeypatch):
    """``kfp.Client`` replaced by a factory of one shared fake (the CLI builds a client per command)."""
    fake = FakeKfp()
    made: list[dict[str, Any]] = []

    def factory(**kw: Any) -> FakeKfp:
        made.append(kw)
        fake.init_kw = kw
        return fake

    monkeypatch.setattr(kfp, "Client", factory)
    return SimpleNamespace(client=fake, made=made)


# --- connect ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {"KFP_HOST": ""}, {"KFP_HOST": "   "}, {"KFP_TOKEN": TOKEN}])
def test_connect_needs_kfp_host(env):
    made = []
    with pytest.raises(ValueError, match="KFP_HOST") as e:
        connect(env, factory=lambda **kw: made.append(kw))
    assert made == [] and TOKEN not in str(e.value)


def test_connect_passes_endpoint_and_auth_from_the_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"KFP_HOST": " https://kubeflow.example.com/pipeline ", "KFP_NAMESPACE": "team-ml", "KFP_TOKEN": TOKEN, "KFP_CA_BUNDLE": str(ca)}
    made = []
    client = connect(env, factory=lambda **kw: made.append(kw) or "client")
    assert client == "client"
    assert made == [{"host": "https://kubeflow.example.com/pipeline", "namespace": "team-ml", "existing_token": TOKEN, "ssl_ca_cert": str(ca)}]


def test_connect_with_only_a_host_passes_only_the_host():
    made = []
    connect({"KFP_HOST": "http://ml-pipeline.kubeflow:8888", "KFP_NAMESPACE": "", "KFP_TOKEN": "", "KFP_CA_BUNDLE": ""},
            factory=lambda **kw: made.append(kw))
    assert made == [{"host": "http://ml-pipeline.kubeflow:8888"}]


@pytest.mark.parametrize("where", ["missing.pem", "."])
def test_connect_refuses_a_ca_bundle_that_is_not_a_file(tmp_path, where):
    path = tmp_path / where
    made = []
    with pytest.raises(ValueError, match="KFP_CA_BUNDLE") as e:
        connect({"KFP_HOST": "https://kfp", "KFP_TOKEN": TOKEN, "KFP_CA_BUNDLE": str(path)}, factory=lambda **kw: made.append(kw))
    assert made == [] and TOKEN not in str(e.value)


def test_connect_reads_os_environ_and_defaults_to_kfp_client(kfp_factory, monkeypatch):
    monkeypatch.setenv("KFP_HOST", "http://ml-pipeline.kubeflow:8888")
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    assert connect() is kfp_factory.client
    assert kfp_factory.made == [{"host": "http://ml-pipeline.kubeflow:8888", "existing_token": TOKEN}]


# --- upload -------------------------------------------------------------------------------------------


def test_first_upload_creates_the_pipeline_then_the_named_version():
    c = FakeKfp("team-ml")
    r = upload(c, version="0.1.0-abc")
    pid = c.pipelines[PIPELINE_NAME]
    assert isinstance(r, Uploaded) and r.created
    assert (r.pipeline_id, r.version_name) == (pid, "0.1.0-abc")
    assert [m for m, _ in c.calls] == ["get_pipeline_id", "upload_pipeline", "list_pipeline_versions", "upload_pipeline_version"]
    (created,) = c.called("upload_pipeline")
    assert created["pipeline_package_path"] == str(packaged_pipeline())
    assert created["pipeline_name"] == PIPELINE_NAME and created["namespace"] == "team-ml"
    (looked,) = c.called("list_pipeline_versions")
    assert looked["pipeline_id"] == pid and _predicates(looked["filter"]) == {"display_name": "0.1.0-abc"}
    (uploaded,) = c.called("upload_pipeline_version")
    assert uploaded["pipeline_package_path"] == str(packaged_pipeline())
    assert (uploaded["pipeline_version_name"], uploaded["pipeline_id"]) == ("0.1.0-abc", pid)
    assert pipeline_sha256(packaged_pipeline()) in uploaded["description"] and __version__ in uploaded["description"]
    assert r.version_id == c.versions[pid][-1].pipeline_version_id
    assert [v.display_name for v in c.versions[pid]] == [PIPELINE_NAME, "0.1.0-abc"]


def test_same_version_again_uploads_nothing():
    c = FakeKfp()
    first = upload(c, version="0.1.0-abc")
    c.calls.clear()
    again = upload(c, version="0.1.0-abc")
    assert again == Uploaded(first.pipeline_id, first.version_id, "0.1.0-abc", False)
    assert [m for m, _ in c.calls] == ["get_pipeline_id", "list_pipeline_versions"]


def test_new_version_of_an_existing_pipeline():
    c = with_versions("0.1.0-old")
    pid = c.pipelines[PIPELINE_NAME]
    r = upload(c, version="0.1.0-new")
    assert r.created and r.pipeline_id == pid and c.called("upload_pipeline") == []
    assert [v.display_name for v in c.versions[pid]] == ["0.1.0-old", "0.1.0-new"]


def test_version_name_defaults_to_the_code_revision():
    c = FakeKfp()
    r = upload(c)
    assert r.version_name == version_name() == f"{__version__}-{REVISION[:12]}"
    assert c.called("upload_pipeline_version")[0]["pipeline_version_name"] == r.version_name


def test_upload_of_another_package(tmp_path, monkeypatch):
    pkg = tmp_path / "p.yaml"
    pkg.write_text(packaged_pipeline().read_text() + "\n# changed\n")
    monkeypatch.setenv("M3I_CODE_REVISION", REVISION + "+uncommitted")
    c = FakeKfp(namespace="")  # single-user KFP: no namespace
    r = upload(c, package=pkg)
    assert r.version_name == f"{__version__}-{REVISION[:12]}-{pipeline_sha256(pkg)[:8]}"
    assert c.called("upload_pipeline")[0]["namespace"] is None
    assert {a["pipeline_package_path"] for m, a in c.calls if m.startswith("upload")} == {str(pkg)}


# --- start_run --------------------------------------------------------------------------------------------


def test_run_starts_the_newest_version():
    c = with_versions("0.1.0-aaa", "0.1.0-bbb", "0.1.0-ccc")
    pid = c.pipelines[PIPELINE_NAME]
    newest = c.versions[pid][-1]
    params = {"steps": 10, "labelled": ["s3://m3i/raw/a"]}
    r = start_run(c, params, experiment="nightly", service_account="m3i-pipeline")
    assert latest_version(c) == (pid, newest.pipeline_version_id, "0.1.0-ccc")
    listed = c.called("list_pipeline_versions")[0]
    assert (listed["pipeline_id"], listed["sort_by"], listed["page_size"]) == (pid, "created_at desc", 1)
    (exp,) = c.called("create_experiment")
    assert (exp["name"], exp["namespace"]) == ("nightly", "team-ml")
    (run,) = c.called("run_pipeline")
    assert run["pipeline_id"] == pid and run["version_id"] == newest.pipeline_version_id
    assert run["experiment_id"] == c.experiments[("nightly", "team-ml")].experiment_id
    assert run["params"] == params and run["params"] is not params
    assert run["job_name"] == f"{PIPELINE_NAME} 0.1.0-ccc" and run["service_account"] == "m3i-pipeline"
    assert run["pipeline_package_path"] is None
    assert r == {"run_id": r["run_id"], "pipeline_id": pid, "version_id": newest.pipeline_version_id,
                 "version": "0.1.0-ccc", "experiment_id": run["experiment_id"]}


def test_runs_share_the_experiment_and_take_a_run_name():
    c = with_versions("0.1.0-aaa")
    first = start_run(c, {})
    second = start_run(c, {"steps": 5}, run_name="retrain after fix")
    assert first["experiment_id"] == second["experiment_id"] and len(c.experiments) == 1
    assert first["run_id"] != second["run_id"]
    assert [a["job_name"] for a in c.called("run_pipeline")] == [f"{PIPELINE_NAME} 0.1.0-aaa", "retrain after fix"]
    assert c.called("run_pipeline")[1]["service_account"] is None


def test_run_without_the_pipeline_is_a_lookup_error():
    c = FakeKfp()
    with pytest.raises(LookupError, match="m3i pipeline upload"):
        start_run(c, {})
    assert c.called("run_pipeline") == [] and c.called("create_experiment") == []


def test_run_of_a_pipeline_without_versions_is_a_lookup_error():
    c = with_versions()
    with pytest.raises(LookupError, match="no versions"):
        start_run(c, {})
    assert c.called("run_pipeline") == []


# --- schedule ----------------------------------------------------------------------------------------------


def test_schedule_always_runs_the_latest_version():
    c = with_versions("0.1.0-aaa", "0.1.0-bbb")
    pid = c.pipelines[PIPELINE_NAME]
    params = {"steps": 10, "gpus_per_node": 4}
    r = schedule(c, "0 3 * * 0", name="m3i-weekly", experiment="retrain", params=params, service_account="m3i-pipeline")
    (call,) = c.called("create_recurring_run")
    body = call["recurring_run"]
    assert isinstance(body, kfp_server_api.V2beta1RecurringRun)
    # A pipeline reference without a version id: KFP resolves the latest at each trigger.
    ref = body.pipeline_version_reference
    assert ref.pipeline_id == pid and ref.pipeline_version_id is None and body.pipeline_version_id is None
    assert body.pipeline_spec is None
    assert body.trigger.cron_schedule.cron == "0 0 3 * * 0" and body.trigger.periodic_schedule is None
    assert body.max_concurrency == "1" and body.no_catchup is True
    assert body.mode == kfp_server_api.RecurringRunMode.ENABLE
    assert body.runtime_config.parameters == params
    assert (body.display_name, body.service_account) == ("m3i-weekly", "m3i-pipeline")
    exp_id = c.experiments[("retrain", "team-ml")].experiment_id
    assert body.experiment_id == exp_id
    assert r == {"recurring_run_id": c.recurring[0].recurring_run_id, "pipeline_id": pid, "experiment_id": exp_id,
                 "cron": "0 0 3 * * 0", "replaced": []}
    # What goes over the wire.
    wire = kfp_server_api.ApiClient().sanitize_for_serialization(body)
    assert wire["pipeline_version_reference"] == {"pipeline_id": pid}
    assert wire["max_concurrency"] == "1" and wire["no_catchup"] is True and wire["mode"] == "ENABLE"
    assert "pipeline_version_id" not in wire


def test_schedule_replaces_a_recurring_run_of_the_same_name():
    c = with_versions("0.1.0-aaa")
    first = schedule(c, "0 3 * * 0", name="m3i-weekly")
    other = schedule(c, "0 4 * * *", name="m3i-daily")
    c.calls.clear()
    second = schedule(c, "0 5 * * 0", name="m3i-weekly", max_concurrency=2, enabled=False)
    assert second["replaced"] == [first["recurring_run_id"]]
    # Created before the old one goes: a refused create keeps the old schedule.
    assert [m for m, _ in c.calls] == ["get_pipeline_id", "create_experiment", "list_recurring_runs", "create_recurring_run", "delete_recurring_run"]
    listed = c.called("list_recurring_runs")[0]
    assert listed["experiment_id"] == second["experiment_id"] and _predicates(listed["filter"]) == {"display_name": "m3i-weekly"}
    assert c.called("delete_recurring_run") == [{"recurring_run_id": first["recurring_run_id"]}]
    assert sorted(r.recurring_run_id for r in c.recurring) == sorted([other["recurring_run_id"], second["recurring_run_id"]])
    body = c.called("create_recurring_run")[0]["recurring_run"]
    assert body.max_concurrency == "2" and body.mode == kfp_server_api.RecurringRunMode.DISABLE
    assert body.runtime_config.parameters == {}


@pytest.mark.parametrize("value", [0, -1])
def test_schedule_refuses_max_concurrency_below_one(value):
    c = with_versions("0.1.0-aaa")
    with pytest.raises(ValueError, match=f"max_concurrency={value}"):
        schedule(c, "0 3 * * 0", max_concurrency=value)
    assert c.calls == []


def test_schedule_refuses_a_bad_cron_before_touching_kfp():
    c = with_versions("0.1.0-aaa")
    with pytest.raises(ValueError, match="'weekly'"):
        schedule(c, "weekly")
    assert c.calls == []


def test_schedule_without_the_pipeline_is_a_lookup_error():
    c = FakeKfp()
    with pytest.raises(LookupError, match="m3i pipeline upload"):
        schedule(c, "0 3 * * 0")
    assert c.called("create_recurring_run") == []


# --- cron, params ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr, want", [
    ("0 3 * * 0", "0 0 3 * * 0"),
    ("*/15 * * * *", "0 */15 * * * *"),
    ("  0   3 * *   0 ", "0 0 3 * * 0"),
    ("30 0 3 * * 0", "30 0 3 * * 0"),
    ("0 0 3 * * MON-FRI", "0 0 3 * * MON-FRI"),
])
def test_normalize_cron(expr, want):
    assert normalize_cron(expr) == want


@pytest.mark.parametrize("expr", ["", "* * * *", "0 0 3 * * 0 2025"])
def test_normalize_cron_refuses_other_field_counts(expr):
    """Anything but 5 or 6 fields (or an @-descriptor, which passes) is refused."""
    with pytest.raises(ValueError, match=re.escape(repr(expr))):
        normalize_cron(expr)


def test_normalize_cron_passes_descriptors():
    assert normalize_cron("@weekly") == "@weekly" and normalize_cron(" @every 1h ") == "@every 1h"


def test_parse_params_keeps_text_and_check_params_types_it():
    items = [
        "steps=10", "eval_fraction=0.05", "labelled=[\"s3://m3i/raw/a\", \"s3://m3i/raw/b\"]",
        "gpu_node_selector={\"pool\": \"h100\"}", "preset=default", "storage_uri=s3://m3i", "run_name=2024",
        "overrides=[\"train.lr=1e-4\"]", "model_name=true",
    ]
    raw = parse_params(items)
    assert raw["steps"] == "10" and raw["model_name"] == "true"
    assert check_params(raw) == {
        "steps": 10, "eval_fraction": 0.05, "labelled": ["s3://m3i/raw/a", "s3://m3i/raw/b"],
        "gpu_node_selector": {"pool": "h100"}, "preset": "default", "storage_uri": "s3://m3i",
        "run_name": "2024",  # a string parameter keeps its text: not the number 2024
        "overrides": ["train.lr=1e-4"], "model_name": "true",
    }
    assert parse_params(None) == {} and parse_params([]) == {}
    assert parse_params(["steps=1", "steps=2"]) == {"steps": "2"}  # the last one wins
    assert check_params({"steps": 10, "gpu_tolerations": []}) == {"steps": 10, "gpu_tolerations": []}  # --params JSON: typed already


@pytest.mark.parametrize(
    "params, message",
    [
        ({"steps": "ten"}, "steps='ten' is not a number_integer"),
        ({"steps": 1.5}, "steps=1.5 must be number_integer"),
        ({"steps": True}, "steps=True must be number_integer"),
        ({"labelled": "s3://m3i/raw"}, "labelled='s3://m3i/raw' is not a list"),
        ({"labelled": {"a": 1}}, "must be list"),
        ({"run_name": 5}, "run_name=5 must be string"),
    ],
)
def test_check_params_refuses_the_wrong_type(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_params(params)


@pytest.mark.parametrize("item", ["steps", "=10", ""])
def test_parse_params_needs_key_and_equals(item):
    with pytest.raises(ValueError, match=re.escape(repr(item))):
        parse_params(["steps=1", item])


def test_pipeline_parameters_of_the_packaged_pipeline(packaged_params):
    params = packaged_params
    assert params["gpus_per_node"] == 8 and type(params["gpus_per_node"]) is int
    assert params["steps"] == 0 and type(params["steps"]) is int
    assert params["storage_uri"] == "s3://m3i" and params["preset"] == "default"
    assert isinstance(params["eval_fraction"], float)
    doc = next(yaml.safe_load_all(packaged_pipeline().read_text()))
    defs = doc["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(defs)
    for name, spec in defs.items():
        if spec.get("parameterType") == "NUMBER_INTEGER":
            assert type(params[name]) is int, name


def test_pipeline_parameters_of_another_package(tmp_path):
    pkg = tmp_path / "p.yaml"
    pkg.write_text(yaml.safe_dump_all([
        {"root": {"inputDefinitions": {"parameters": {
            "steps": {"parameterType": "NUMBER_INTEGER", "defaultValue": 7.0},
            "required": {"parameterType": "STRING"},
            "count": {"parameterType": "NUMBER_INTEGER"},
        }}}},
        {"platforms": {"kubernetes": {}}},  # the platform spec follows the pipeline spec
    ]))
    assert pipeline_parameters(pkg) == {"steps": 7, "required": None, "count": None}


def test_check_params_names_the_unknown_and_lists_the_known(packaged_params):
    check_params({"steps": 10, "gpus_per_node": 4})
    with pytest.raises(ValueError) as e:
        check_params({"steps": 10, "bogus": 1, "lr": 0.1})
    msg = str(e.value)
    assert "'bogus'" in msg and "'lr'" in msg and "'steps'" not in msg.split(";")[0]
    assert all(repr(name) in msg.split(";")[1] for name in packaged_params)


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_params_lists_parameters_and_defaults(capsys, packaged_params):
    assert main(["pipeline", "params"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.match(r"  (\S+)\s+(.*)$", line).groups() for line in out.splitlines())
    assert set(rows) == set(packaged_params)
    assert rows["gpus_per_node"] == "8" and rows["steps"] == "0" and rows["storage_uri"] == '"s3://m3i"'
    assert list(rows) == sorted(rows)


def test_cli_run_refuses_an_unknown_parameter_before_connecting(kfp_factory, monkeypatch, capsys):
    monkeypatch.setenv("KFP_HOST", "http://ml-pipeline.kubeflow:8888")
    assert main(["pipeline", "run", "--param", "bogus=1", "--param", "steps=10"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("m3i pipeline: error:") and "'bogus'" in line
    assert captured.out == "" and kfp_factory.made == []


def test_cli_upload_without_kfp_host(monkeypatch, capsys):
    assert main(["pipeline", "upload"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("m3i pipeline: error:") and "KFP_HOST" in line


def test_cli_run_without_an_uploaded_pipeline_fails(kfp_factory, monkeypatch, capsys):
    monkeypatch.setenv("KFP_HOST", "http://ml-pipeline.kubeflow:8888")
    assert main(["pipeline", "run"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("m3i pipeline: failed:") and "m3i pipeline upload" in line


def test_cli_upload_run_schedule_without_leaking_the_token(kfp_factory, monkeypatch, capsys, caplog, tmp_path):
    monkeypatch.setenv("KFP_HOST", "https://kubeflow.example.com/pipeline")
    monkeypatch.setenv("KFP_NAMESPACE", "team-ml")
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    fake = kfp_factory.client
    printed = []

    def cli(*argv: str) -> tuple[int, str]:
        code = main(["pipeline", *argv])
        captured = capsys.readouterr()
        printed.append(captured.out + captured.err)
        return code, captured.out

    version = version_name()
    code, out = cli("upload")
    pid = fake.pipelines[PIPELINE_NAME]
    vid = fake.versions[pid][-1].pipeline_version_id
    assert code == 0 and out == f"uploaded m3i-pretrain version {version} (pipeline {pid}, version {vid})\n"
    code, out = cli("upload")
    assert code == 0 and out.startswith(f"already there: m3i-pretrain version {version} ")

    code, out = cli("run", "--param", "steps=10", "--param", "labelled=[\"s3://m3i/raw\"]", "--experiment", "nightly",
                    "--run-name", "smoke", "--service-account", "m3i-pipeline")
    (run,) = fake.called("run_pipeline")
    assert code == 0
    assert re.fullmatch(rf"started run run-\d+ of m3i-pretrain {re.escape(version)} in experiment nightly\n", out)
    assert run["params"] == {"steps": 10, "labelled": ["s3://m3i/raw"]} and run["job_name"] == "smoke"
    assert run["version_id"] == vid and run["service_account"] == "m3i-pipeline"

    code, out = cli("schedule", "--cron", "0 3 * * 0", "--param", "steps=10")
    (rr,) = fake.recurring
    assert code == 0
    assert out == f"recurring run m3i-pretrain-scheduled ({rr.recurring_run_id}): cron '0 0 3 * * 0', latest version, max concurrency 1\n"
    body = fake.called("create_recurring_run")[0]["recurring_run"]
    assert body.runtime_config.parameters == {"steps": 10} and body.display_name == "m3i-pretrain-scheduled"
    code, out = cli("schedule", "--cron", "0 3 * * 0", "--param", "steps=20", "--max-concurrency", "2")
    assert code == 0 and out.endswith("max concurrency 2, replacing 1\n")

    # Refusals print the endpoint's problems, never the token.
    assert cli("schedule", "--cron", "0 3 * *")[0] == 2
    assert cli("schedule", "--cron", "0 3 * * 0", "--max-concurrency", "0")[0] == 2
    monkeypatch.setenv("KFP_CA_BUNDLE", str(tmp_path / "missing.pem"))
    assert cli("upload")[0] == 2

    # Every client got the token, and nothing printed or logged shows it.
    assert kfp_factory.made and all(kw["existing_token"] == TOKEN for kw in kfp_factory.made)
    assert all(kw["namespace"] == "team-ml" for kw in kfp_factory.made)
    assert not any(TOKEN in text for text in printed) and TOKEN not in caplog.text


def test_cli_schedule_with_the_fake(kfp_factory, monkeypatch, capsys):
    monkeypatch.setenv("KFP_HOST", "http://ml-pipeline.kubeflow:8888")
    upload(kfp_factory.client, version="0.1.0-aaa")
    assert main(["pipeline", "schedule", "--cron", "0 3 * * 0", "--param", "steps=10"]) == 0
    (rr,) = kfp_factory.client.recurring
    assert capsys.readouterr().out == (
        f"recurring run m3i-pretrain-scheduled ({rr.recurring_run_id}): cron '0 0 3 * * 0', latest version, max concurrency 1\n"
    )


def test_cli_reports_an_api_error_in_one_line(kfp_factory, monkeypatch, capsys):
    """A refusal of the KFP API (expired token, no rights) is a failure (1) in one line, not a traceback."""
    monkeypatch.setenv("KFP_HOST", "https://kubeflow.example.com/pipeline")
    monkeypatch.setenv("KFP_TOKEN", TOKEN)

    def refused(*args: Any, **kw: Any) -> None:
        raise kfp_server_api.ApiException(status=401, reason="Unauthorized")

    monkeypatch.setattr(kfp_factory.client, "get_pipeline_id", refused)
    for argv in (["upload"], ["run"], ["schedule", "--cron", "0 3 * * 0"]):
        assert main(["pipeline", *argv]) == 1, argv
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith("m3i pipeline: failed:") and "401" in line, argv
        assert TOKEN not in captured.out + captured.err
