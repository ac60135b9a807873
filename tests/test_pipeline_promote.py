"""The pipeline's promotion: the gate and the condition around the promote step in the compiled IR, the
champion start resolved at run time, and the steps (m3i.pipeline.promotion) on tiny real exports."""

from __future__ import annotations

import shutil

import pytest
import yaml

from m3i.pipeline.build import SOURCE_PIPELINE
from m3i.pipeline.promotion import gate_model, record_decision, start_point
from m3i.promote import ChampionDamaged, Ledger, promote
from m3i.storage import join_uri, open_store
from tests.promote_helpers import fake_dataset, log_seqs, make_export, metrics_doc, pointer_bytes, promote_cfg, write_metrics

NAME = "m"


@pytest.fixture(scope="module")
def spec() -> dict:
    """The committed IR (tests/test_pipeline.py fails when it is not what the source compiles to)."""
    return next(yaml.safe_load_all(SOURCE_PIPELINE.read_text()))


def _dag(spec: dict, component: str) -> dict:
    return spec["components"][component]["dag"]["tasks"]


def test_the_compiled_pipeline_holds_the_gate_and_the_condition_around_promote(spec):
    root = spec["root"]["dag"]["tasks"]
    gate = root["gate"]
    assert {a["taskOutputArtifact"]["producerTask"] for a in gate["inputs"]["artifacts"].values()} == {"export", "evaluate"}
    outputs = spec["components"]["comp-gate"]["outputDefinitions"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()} == {
        "metrics": "system.Metrics", "report": "system.Markdown", "decision": "system.Artifact",
    }
    assert outputs["parameters"]["Output"]["parameterType"] == "STRING"
    # dsl.If on the gate's decision around the promote step; dsl.Elif records a rejection
    (branches,) = [k for k, v in root.items() if "gate" in v.get("dependentTasks", []) and k.startswith("condition-branches")]
    conds = {t: v["triggerPolicy"]["condition"] for t, v in _dag(spec, f"comp-{branches}").items()}
    assert sorted(conds.values()) == [
        "!(inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote') && "
        "inputs.parameter_values['pipelinechannel--gate-Output'] == 'reject'",
        "inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote'",
    ]
    by_cond = {c: next(iter(_dag(spec, f"comp-{t}").values())) for t, c in conds.items()}
    promoted = by_cond["inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote'"]
    rejected = next(v for k, v in by_cond.items() if "'reject'" in k)
    for task, expected in ((promoted, "promote"), (rejected, "reject")):
        params = task["inputs"]["parameters"]
        assert task["componentRef"]["name"] in ("comp-promote", "comp-promote-2")
        assert params["expected"]["runtimeValue"]["constant"] == expected
        assert params["fail_on_reject"]["componentInputParameter"] == "pipelinechannel--fail_on_reject"
        assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert not task["cachingOptions"].get("enableCache") and task["retryPolicy"]["maxRetryCount"] >= 1
    assert not gate["cachingOptions"].get("enableCache")
    # the champion start: resolved by a step at run time, handed to both train branches as their overrides
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["start_from_champion"]["defaultValue"] is False and defaults["fail_on_reject"]["defaultValue"] is False
    start = root["champion"]["inputs"]["parameters"]
    assert start["start_from_champion"]["componentInputParameter"] == "start_from_champion"
    assert start["model_name"]["componentInputParameter"] == "model_name"
    for cond, train in (("comp-condition-2", "train"), ("comp-condition-3", "train-2")):
        overrides = _dag(spec, cond)[train]["inputs"]["parameters"]["overrides"]
        assert overrides == {"componentInputParameter": "pipelinechannel--champion-Output"}


# ---------------------------------------------------------------------------------------------- the steps


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-promote-exports")
    models = root / "models"
    return models, {step: make_export(root, str(models), NAME, step) for step in (1, 2, 3)}


@pytest.fixture
def m(tmp_path, exported):
    """A models root with three versions; ``manifest(step)`` is the export step's manifest, ``scores`` writes metrics.json."""
    src, results = exported
    models = tmp_path / "models"
    shutil.copytree(src, models)
    ds = fake_dataset(str(tmp_path / "eval-data"))

    class M:
        root = str(models)
        version = {k: r.version for k, r in results.items()}
        uri = {k: join_uri(str(models), NAME, r.version) for k, r in results.items()}

        @staticmethod
        def manifest(step: int) -> dict:
            return {"name": NAME, "version": results[step].version, "uri": M.uri[step], "step": step}

        @staticmethod
        def scores(step: int, probe: float) -> str:
            return join_uri(write_metrics(str(tmp_path / "evals" / str(step)), metrics_doc(M.uri[step], ds, probe, 0.5)), "metrics.json")

    return M


def test_start_point_is_the_champion_when_asked_and_there_is_one(m):
    off = start_point(m.root, NAME, start_from_champion=False, overrides=["train.lr=0.1"])
    assert off["overrides"] == ["train.lr=0.1"] and off["init_from"] == ""
    none_yet = start_point(m.root, NAME, start_from_champion=True, overrides=["train.lr=0.1"])
    assert none_yet["overrides"] == ["train.lr=0.1"] and "has no champion yet: random initialisation" in none_yet["reason"]
    promote(promote_cfg(), m.uri[1], m.scores(1, 0.6))
    s = start_point(m.root, NAME, start_from_champion=True, overrides=["train.lr=0.1"])
    assert s["overrides"] == ["train.lr=0.1", f"train.init_from={m.uri[1]}"]
    assert s["init_from"] == m.uri[1] and s["champion"] == m.version[1] and "continued pre-training" in s["reason"]
    with pytest.raises(ValueError, match="both say where training starts"):
        start_point(m.root, NAME, start_from_champion=True, overrides=["train.init_from=s3://b/x"])
    open_store(m.uri[1]).delete("model.safetensors")
    with pytest.raises(ChampionDamaged, match="is damaged"):
        start_point(m.root, NAME, start_from_champion=True)


def test_gate_records_nothing_and_the_promote_step_moves_the_pointer(m):
    g = gate_model(m.manifest(1), m.scores(1, 0.6), m.root, kfp_run_id="run-1")
    assert g["decision"] == "promote" and g["champion"] == "" and g["reasons"][0] == "no champion yet: only the floors apply"
    assert g["scalars"] == {"promote": 1.0, "has_champion": 0.0, "candidate_probe_top1": 0.6}
    assert g["report"].startswith(f"# Promotion gate of m: PROMOTE {m.version[1]}")
    assert log_seqs(m.root, NAME) == [] and pointer_bytes(m.root, NAME) is None
    r = record_decision(m.manifest(1), m.scores(1, 0.6), m.root, expected="promote", kfp_run_id="run-1")
    assert r["decision"] == "promote" and r["moved"] and r["seq"] == 1 and r["champion"] == m.version[1]
    # a retried step finds its own event instead of recording another
    again = record_decision(m.manifest(1), m.scores(1, 0.6), m.root, expected="promote", kfp_run_id="run-1")
    assert again["seq"] == 1 and log_seqs(m.root, NAME) == [1]
    assert Ledger(m.root, NAME).event(1).run.kfp_run_id == "run-1"
    # the same version gated again: nothing to decide
    same = gate_model(m.manifest(1), m.scores(1, 0.6), m.root)
    assert same["decision"] == "champion" and "already is the champion" in same["reasons"][0]


def test_a_worse_candidate_is_recorded_as_rejected_and_fails_only_when_asked(m):
    record_decision(m.manifest(1), m.scores(1, 0.6), m.root, expected="promote", kfp_run_id="run-1")
    before = pointer_bytes(m.root, NAME)
    g = gate_model(m.manifest(2), m.scores(2, 0.5), m.root, kfp_run_id="run-2")
    assert g["decision"] == "reject" and g["champion"] == m.version[1]
    assert g["reasons"] == ["probe.top1 50.00 % vs the champion's 60.00 %: -10.00 points, must be more than +0.00 points: fails"]
    assert g["scalars"]["promote"] == 0.0 and g["scalars"]["delta_probe_top1"] == pytest.approx(-0.1)
    r = record_decision(m.manifest(2), m.scores(2, 0.5), m.root, expected="reject", kfp_run_id="run-2")
    assert r["decision"] == "reject" and not r["moved"] and r["champion"] == m.version[1] and r["seq"] == 2
    assert pointer_bytes(m.root, NAME) == before and Ledger(m.root, NAME).event(2).action == "reject"
    with pytest.raises(RuntimeError, match=r"rejected \(event #3; fail_on_reject is on\): probe.top1 40.00 %"):
        record_decision(m.manifest(3), m.scores(3, 0.4), m.root, expected="reject", kfp_run_id="run-3", fail_on_reject=True)
    assert log_seqs(m.root, NAME) == [1, 2, 3] and pointer_bytes(m.root, NAME) == before  # recorded, then failed


def test_the_promote_step_records_a_fresh_decision_when_the_champion_moved_since_the_gate(m):
    record_decision(m.manifest(1), m.scores(1, 0.6), m.root, expected="promote", kfp_run_id="run-1")
    g = gate_model(m.manifest(2), m.scores(2, 0.7), m.root, kfp_run_id="run-2")
    assert g["decision"] == "promote"
    promote(promote_cfg(), m.uri[3], m.scores(3, 0.9))  # another run promotes in between
    r = record_decision(m.manifest(2), m.scores(2, 0.7), m.root, expected="promote", kfp_run_id="run-2")
    assert r["decision"] == "reject" and r["champion"] == m.version[3] and not r["moved"]
    assert Ledger(m.root, NAME).event(3).champion_before.version == m.version[3]


def test_run_local_prints_the_decision_and_passes_the_promotion_flags(monkeypatch, tmp_path, capsys):
    import m3i.pipeline.local as local
    from m3i.cli import main

    why = "probe.top1 52.22 % vs the champion's 53.89 %: -1.67 points, must be more than +0.00 points: fails"
    manifests = {
        "champion/start": {"champion": "v00000040-bcf40441", "init_from": "/w/store/models/m3i/v00000040-bcf40441", "reason": "x"},
        "gate/decision": {"decision": "reject", "reasons": [why], "candidate": "/w/store/models/m3i/v00000001-aac7fb7a",
                          "champion": "v00000040-bcf40441", "reevaluated": ""},
        "promote-2/event": {"decision": "reject", "reasons": [why], "seq": 2, "champion": "v00000040-bcf40441", "moved": False,
                            "registered": None, "pushed": None},
    }
    seen = {}

    def fake(*a, **kw):
        seen.update(kw)
        return local.LocalRun(tmp_path, "/w/store", tmp_path / "kfp", 1.0, manifests=manifests,
                              artifacts={"gate/report": "/w/kfp/gate/report"}, run_name="local-x")

    monkeypatch.setattr(local, "run_local", fake)
    assert main(["pipeline", "run-local", "--workdir", str(tmp_path), "--steps", "1", "--start-from-champion", "--fail-on-reject"]) == 0
    assert seen["arguments"] == {"steps": 1, "start_from_champion": True, "fail_on_reject": True} and seen["run_name"] == ""
    out = capsys.readouterr().out
    assert "  start      from the champion v00000040-bcf40441 (/w/store/models/m3i/v00000040-bcf40441)\n" in out
    assert "  gate       REJECT v00000001-aac7fb7a against the champion v00000040-bcf40441:\n" f"             {why}\n" in out
    assert "  champion   unchanged: v00000040-bcf40441 (event #2, reject)\n             report /w/kfp/gate/report\n" in out


# ---------------------------------------------------------------------------------------------- run-local, twice


@pytest.mark.slow
def test_run_local_twice_keeps_the_better_model_as_champion_and_says_why(tmp_path):
    """`m3i pipeline run-local` a few dozen steps, then one step, in the same folder: the first run's model
    stays champion, the second is recorded as rejected, and its gate report says why.

    The policy asks a retrain to beat the champion by 5 points and skips the random-init floor, so the
    outcome does not hang on how far a few dozen CPU steps get: a one-step retrain cannot clear 5 points.
    """
    from m3i.pipeline.local import run_local

    w = tmp_path / "w"
    overrides = ["train.warmup_steps=4", "promote.random_init_floor=false", "promote.min_delta=0.05", "promote.guards=[]"]
    first = run_local(w, arguments={"steps": 24, "probe_epochs": 20}, overrides=overrides)
    p1 = first.promotion
    v1 = first.manifests["export/model"]["version"]
    assert p1["decision"] == "promote" and p1["event"]["moved"] and p1["event"]["champion"] == v1
    pointer = (w / "store" / "models" / "m3i" / "champion.json").read_bytes()

    second = run_local(w, arguments={"steps": 1, "probe_epochs": 20}, overrides=overrides)
    assert second.run_name != first.run_name  # a fresh run: it trained anew, not resumed the first
    v2 = second.manifests["export/model"]["version"]
    p2 = second.promotion
    assert v2 != v1 and p2["decision"] == "reject" and p2["champion"] == v1
    assert p2["event"] == {**p2["event"], "decision": "reject", "moved": False, "champion": v1, "seq": 2}
    (why,) = p2["reasons"]
    assert why.startswith("probe.top1 ") and why.endswith("must be more than +5.00 points: fails")
    report = open(second.artifacts["gate/report"]).read()
    assert report.startswith(f"# Promotion gate of m3i: REJECT {v2}") and f"- {why}" in report
    assert (w / "store" / "models" / "m3i" / "champion.json").read_bytes() == pointer
    ledger = Ledger(str(w / "store" / "models"), "m3i")
    assert ledger.state().champion.ref.version == v1 and [e.action for e in ledger.events()] == ["promote", "reject"]
