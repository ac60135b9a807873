"""``m3i promote`` on tiny real exports: gate (promote, reject, dry run, fail on reject), rollback with a
reason, the listing, and the exit codes of bad input (2), a damaged champion and a lost race (1)."""

from __future__ import annotations

import pytest

from m3i.cli import main
from m3i.promote import Ledger, promote
from m3i.storage import join_uri, open_store
from tests.promote_helpers import fake_dataset, log_seqs, make_export, metrics_doc, pointer_bytes, promote_cfg, write_metrics

NAME = "m"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote-cli-exports")
    models = root / "models"
    return models, {step: make_export(root, str(models), NAME, step).version for step in (1, 2, 3)}


@pytest.fixture
def m(tmp_path, exported):
    """A fresh copy of the three versions, an eval data set, and a scores folder per version."""
    import shutil

    src, versions = exported
    models = tmp_path / "models"
    shutil.copytree(src, models)
    ds = fake_dataset(str(tmp_path / "eval-data"))
    uri = {k: join_uri(str(models), NAME, v) for k, v in versions.items()}

    def scores(step: int, probe: float, knn: float = 0.5) -> str:
        return write_metrics(str(tmp_path / "evals" / str(step)), metrics_doc(uri[step], ds, probe, knn))

    return type("M", (), {"models": str(models), "version": versions, "uri": uri, "scores": staticmethod(scores)})


def champion(m) -> str | None:
    state = Ledger(m.models, NAME).state()
    return state.champion.ref.version if state.champion else None


def test_gate_promotes_then_rejects_a_worse_retrain_and_prints_why(m, capsys, tmp_path):
    # --model defaults to the model metrics.json names: m3i evaluate --model <export> then m3i promote
    assert main(["promote", "--metrics", m.scores(1, probe=0.6)]) == 0
    out = capsys.readouterr().out
    assert f"gate of m {m.version[1]} (step 1) against no champion (only the floors apply): PROMOTE" in out
    assert f"event #1 (promote) recorded; champion moved to {m.version[1]}" in out
    before = pointer_bytes(m.models, NAME)

    report = tmp_path / "gate.md"
    assert main(["promote", "--model", m.uri[2], "--metrics", m.scores(2, probe=0.55), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"gate of m {m.version[2]} (step 2) against champion {m.version[1]}: REJECT" in out
    assert "  probe.top1 55.00 % vs the champion's 60.00 %: -5.00 points, must be more than +0.00 points: fails" in out
    assert f"event #2 (reject) recorded; champion unchanged: {m.version[1]}" in out
    assert pointer_bytes(m.models, NAME) == before and champion(m) == m.version[1]
    assert report.read_text().startswith(f"# Promotion gate of m: REJECT {m.version[2]}")


def test_fail_on_reject_by_flag_or_config_exits_1_and_still_records(m, capsys):
    assert main(["promote", "--metrics", m.scores(1, probe=0.6)]) == 0
    assert main(["promote", "--metrics", m.scores(2, probe=0.5), "--fail-on-reject"]) == 1
    assert f"{m.version[2]} rejected (--fail-on-reject): probe.top1 50.00 %" in capsys.readouterr().err
    assert main(["promote", "--metrics", m.scores(3, probe=0.4), "--set", "promote.fail_on_reject=true"]) == 1
    assert log_seqs(m.models, NAME) == [1, 2, 3] and champion(m) == m.version[1]
    # a promotion is never a failure
    assert main(["promote", "--metrics", m.scores(3, probe=0.7), "--fail-on-reject"]) == 0
    assert champion(m) == m.version[3]


def test_dry_run_decides_and_records_nothing(m, capsys):
    assert main(["promote", "--metrics", m.scores(1, probe=0.6), "--dry-run", "--report", "-"]) == 0
    out = capsys.readouterr().out
    assert ": PROMOTE (dry run)" in out and "dry run: nothing recorded, the pointer not moved" in out
    assert f"# Promotion gate of m: PROMOTE {m.version[1]}" in out  # --report - prints the Markdown
    assert log_seqs(m.models, NAME) == [] and pointer_bytes(m.models, NAME) is None


def test_rollback_and_listing(m, capsys):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], m.scores(1, probe=0.6))
    promote(cfg, m.uri[2], m.scores(2, probe=0.7))
    capsys.readouterr()
    # one model under the root: --name may be left out
    assert main(["promote", "--list", "--models", m.models]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Versions of m\n")
    assert f"| champion | `{m.version[2]}` | 2 |" in out and "| 70.00 % | promote #2 |" in out
    assert f"|  | `{m.version[3]}` | 3 |" in out and "never gated" in out
    assert f"Champion: `{m.version[2]}` (promote #2 at " in out

    assert main(["promote", "--to", m.version[1], "--models", m.models, "--name", NAME, "--reason", "v2 mislabels cats"]) == 0
    out = capsys.readouterr().out
    assert out == f"rolled m back to {m.version[1]} (event #3; the champion was {m.version[2]}): v2 mislabels cats\n"
    assert champion(m) == m.version[1] and Ledger(m.models, NAME).pointer().reason == "v2 mislabels cats"
    assert main(["promote", "--list", "--set", f"export.out={m.models}", "--set", f"export.name={NAME}"]) == 0
    assert f"| champion | `{m.version[1]}` | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--to", "v00000001-00000000"], "--to needs --reason TEXT"),
        (["--list", "--dry-run"], "--dry-run gate a candidate; they do not go with --list"),
        (["--list", "--reason", "x"], "--reason goes with --to"),
        (["--reason", "x"], "go with --to or --list"),
        (["--set", "promote.primary=probe.top2"], "promote.primary='probe.top2' is not a known score"),
        (["--list", "--models", "{root}/nowhere"], "no exported model under"),
    ],
)
def test_bad_input_exits_2_with_one_line(m, capsys, argv, message, tmp_path):
    argv = [a.replace("{root}", str(tmp_path)) for a in argv]
    assert main(["promote", "--models", m.models, *argv] if "--to" in argv else ["promote", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3i promote: error: ") and message in err and err.count("\n") == 1
    assert log_seqs(m.models, NAME) == []


def test_bad_candidates_exit_2_and_move_nothing(m, capsys, tmp_path):
    assert main(["promote", "--metrics", str(tmp_path / "no-scores")]) == 2
    assert "run `m3i evaluate` on the candidate first" in capsys.readouterr().err
    assert main(["promote", "--model", m.uri[2], "--metrics", m.scores(1, probe=0.6)]) == 2
    assert "not of the candidate" in capsys.readouterr().err
    assert log_seqs(m.models, NAME) == []


def test_a_damaged_champion_exits_1_and_offers_the_rollback(m, capsys):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], m.scores(1, probe=0.6))
    promote(cfg, m.uri[2], m.scores(2, probe=0.7))
    open_store(m.uri[2]).delete("model.safetensors")
    assert main(["promote", "--metrics", m.scores(3, probe=0.8)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"m3i promote: failed: the champion of model 'm', {m.version[2]}, is damaged") and err.count("\n") == 1
    assert f"`m3i promote --to {m.version[1]}`" in err
    assert log_seqs(m.models, NAME) == [1, 2]
    assert main(["promote", "--to", m.version[1], "--models", m.models, "--reason", "v2 lost its weights"]) == 0
    assert champion(m) == m.version[1]


def test_a_lost_race_exits_1_naming_the_winner(m, capsys, monkeypatch):
    """Another promotion commits between this one's decision and its record: nothing moves, the winner is named."""
    import m3i.promote.run as run

    real_decide = run.decide

    def decide_then_lose(cfg, candidate, metrics, **kw):
        plan = real_decide(cfg, candidate, metrics, **kw)
        if candidate == m.uri[2]:
            monkeypatch.setattr(run, "decide", real_decide)
            promote(cfg, m.uri[3], m.scores(3, probe=0.9))  # the winner
        return plan

    monkeypatch.setattr(run, "decide", decide_then_lose)
    assert main(["promote", "--metrics", m.scores(2, probe=0.7)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("m3i promote: failed: lost the race for event #1 of model 'm': ")
    assert f"the promote of {m.version[3]}" in err and "nothing was recorded for the promote of" in err
    assert champion(m) == m.version[3] and log_seqs(m.models, NAME) == [1]
