"""``m3i.promote`` end to end on tiny real exports, on a local folder and on a real S3 server (moto):
a worse retrain is not promoted and a better one is, rollback, two promotions at once, the champion
re-evaluated when the eval sets differ, bad input, the listing and the Pushgateway metrics."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from m3i.promote import (
    ChampionDamaged,
    Ledger,
    PromoteError,
    PromotionConflict,
    RunInfo,
    commit,
    decide,
    list_versions,
    promote,
    rollback,
)
from m3i.storage import join_uri, open_store
from tests.prometheus import parse_metrics, pushgateway  # noqa: F401 - a fixture
from tests.promote_helpers import fake_dataset, log_seqs, make_export, metrics_doc, pointer_bytes, promote_cfg, write_metrics

NAME = "m"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Four real exports of model ``m`` (steps 1-4) in a local folder, copied into each test's store."""
    root = tmp_path_factory.mktemp("promote-exports")
    models = root / "models"
    versions = {step: make_export(root, str(models), NAME, step).version for step in (1, 2, 3, 4)}
    return models / NAME, versions


@pytest.fixture
def m(store_uri, exported):
    """A models root holding the four versions, an eval data set, and each version's URI."""
    src, versions = exported
    models_uri = join_uri(store_uri, "models")
    target = open_store(join_uri(models_uri, NAME))
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            target.put_file(path.relative_to(src).as_posix(), str(path))
    return SimpleNamespace(
        models=models_uri, ds=fake_dataset(join_uri(store_uri, "eval-data")), root=store_uri,
        version=versions, uri={k: join_uri(models_uri, NAME, v) for k, v in versions.items()},
    )


def scores(m, step: int, probe: float, knn: float = 0.5, ds: str | None = None) -> dict:
    return metrics_doc(m.uri[step], ds or m.ds, probe, knn)


def champion_version(m) -> str | None:
    state = Ledger(m.models, NAME).state()
    return state.champion.ref.version if state.champion else None


# ---------------------------------------------------------------------------------------------- gate + pointer


def test_a_worse_retrain_is_not_promoted_and_a_better_one_is(m):
    cfg = promote_cfg()
    first = promote(cfg, m.uri[1], scores(m, 1, probe=0.60), run=RunInfo(kfp_run_id="kfp-1"))
    assert first.promoted and first.champion_before is None and first.event.seq == 1
    assert first.champion.run.kfp_run_id == "kfp-1" and first.champion.run.run_id == "fake run/1"  # from export.json
    before = pointer_bytes(m.models, NAME)

    # a worse retrain: rejected, recorded, the pointer byte for byte unchanged
    worse = promote(cfg, m.uri[2], write_metrics(join_uri(m.root, "evals", "2"), scores(m, 2, probe=0.55)))
    assert not worse.promoted and worse.decision.outcome == "reject"
    assert worse.champion.ref.version == m.version[1] and pointer_bytes(m.models, NAME) == before
    assert worse.event.action == "reject" and worse.event.champion is None and worse.event.champion_before.version == m.version[1]
    assert worse.event.decision["reasons"] == ["probe.top1 55.00 % vs the champion's 60.00 %: -5.00 points, must be more than +0.00 points: fails"]
    assert "# Promotion gate of m: REJECT " in worse.report and "| `probe.top1` | 55.00 % | 60.00 % | -5.00 | 20.00 % |" in worse.report

    # a better one: promoted, the pointer moves and names the one it replaced
    better = promote(cfg, m.uri[3], scores(m, 3, probe=0.65))
    assert better.promoted and log_seqs(m.models, NAME) == [1, 2, 3]
    pointer = Ledger(m.models, NAME).pointer()
    assert pointer.ref.version == m.version[3] and pointer.previous.version == m.version[1] and pointer.seq == 3
    assert pointer.scores["probe.top1"] == 0.65 and pointer.eval_set.fingerprint == better.event.eval_set.fingerprint
    assert pointer.ref.sha256 == open_store(m.uri[3]).sha256("model.safetensors")

    listing = list_versions(m.models, NAME)
    assert [(r.ref.version, r.champion, r.last_action, r.scores.get("probe.top1")) for r in listing.rows] == [
        (m.version[4], False, "", None), (m.version[3], True, "promote", 0.65),
        (m.version[2], False, "reject", 0.55), (m.version[1], False, "promote", 0.60),
    ]
    assert listing.champion_problem is None and f"Champion: `{m.version[3]}`" in listing.markdown()


def test_a_dry_run_decides_and_records_nothing(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.6))
    before = pointer_bytes(m.models, NAME)
    r = promote(cfg, m.uri[2], scores(m, 2, probe=0.7), dry_run=True)
    assert r.decision.promote and not r.promoted and r.event is None and r.dry_run
    assert pointer_bytes(m.models, NAME) == before and log_seqs(m.models, NAME) == [1]


def test_rollback_makes_an_older_version_champion_again_with_its_reason(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.60))
    promote(cfg, m.uri[2], scores(m, 2, probe=0.70))
    r = rollback(m.models, NAME, m.version[1], "v2 mislabels cats in production", run=RunInfo(kfp_run_id="ops-7"))
    assert r.champion.ref.version == m.version[1] and r.champion.action == "rollback" and r.previous.ref.version == m.version[2]
    pointer = Ledger(m.models, NAME).pointer()
    assert pointer == r.champion and pointer.reason == "v2 mislabels cats in production" and pointer.run.kfp_run_id == "ops-7"
    assert pointer.scores["probe.top1"] == 0.60  # its scores come along from the log
    assert log_seqs(m.models, NAME) == [1, 2, 3] and Ledger(m.models, NAME).event(3).action == "rollback"
    # the next candidate is gated against the rolled-back-to champion
    again = promote(cfg, m.uri[3], scores(m, 3, probe=0.65))
    assert again.promoted and again.champion_before.ref.version == m.version[1]

    with pytest.raises(ValueError, match="already is the champion"):
        rollback(m.models, NAME, m.version[3], "no-op")
    with pytest.raises(ValueError, match="needs a reason"):
        rollback(m.models, NAME, m.version[1], "  ")
    with pytest.raises(ValueError, match=r"has no version 'v00000009-00000000' .* it has \['v00000001-"):
        rollback(m.models, NAME, "v00000009-00000000", "typo")
    with pytest.raises(ValueError, match="is not an export version"):
        rollback(m.models, NAME, "../other", "escape")
    assert log_seqs(m.models, NAME) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- concurrency


def test_two_promotions_at_once_one_wins_and_the_other_says_it_lost(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    plans = [decide(cfg, m.uri[s], scores(m, s, probe=0.6 + s / 100)) for s in (2, 3)]
    assert [p.seq for p in plans] == [2, 2] and all(p.decision.promote for p in plans)
    barrier, outcome = threading.Barrier(2), {}

    def run(plan):
        barrier.wait()
        try:
            outcome[plan.candidate.version] = commit(plan)
        except PromotionConflict as e:
            outcome[plan.candidate.version] = e

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [v for v, o in outcome.items() if not isinstance(o, Exception)]
    lost = [o for o in outcome.values() if isinstance(o, PromotionConflict)]
    assert len(won) == 1 and len(lost) == 1
    assert lost[0].seq == 2 and lost[0].winner.candidate.version == won[0]
    assert f"the promote of {won[0]}" in str(lost[0]) and "nothing was recorded" in str(lost[0])
    assert log_seqs(m.models, NAME) == [1, 2] and champion_version(m) == won[0]
    assert Ledger(m.models, NAME).pointer().ref.version == won[0]


def test_racing_promotions_leave_a_consistent_log(m):
    """Four promotions started together: each wins or reports it lost; the log is a chain without gaps."""
    cfg = promote_cfg()
    barrier, results = threading.Barrier(4), {}

    def run(step):
        barrier.wait()
        try:
            results[step] = promote(cfg, m.uri[step], scores(m, step, probe=0.5 + step / 100))
        except PromotionConflict as e:
            results[step] = e

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorded = [r for r in results.values() if not isinstance(r, PromotionConflict)]
    assert recorded and len(recorded) + sum(isinstance(r, PromotionConflict) for r in results.values()) == 4
    ledger = Ledger(m.models, NAME)
    events = list(ledger.events())
    assert [e.seq for e in events] == list(range(1, len(recorded) + 1))
    assert sorted(e.candidate.version for e in events) == sorted(r.candidate.version for r in recorded)
    champion = None
    for e in events:  # each event was gated against the champion the events before it made
        assert (e.champion_before.version if e.champion_before else None) == champion
        champion = e.champion.ref.version if e.champion else champion
    assert ledger.pointer().ref.version == champion == champion_version(m)


def _process_promote(cfg, candidate, doc, barrier, out) -> None:
    plan = decide(cfg, candidate, doc)
    barrier.wait()
    try:
        out.put(("won", commit(plan).candidate.version))
    except PromotionConflict as e:
        out.put(("lost", e.winner.candidate.version))


def test_two_processes_promoting_at_once(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_process_promote, args=(cfg, m.uri[s], scores(m, s, probe=0.7), barrier, out)) for s in (2, 3)]
    try:
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    (lost, winner_seen), (won, winner) = results
    assert (lost, won) == ("lost", "won") and winner_seen == winner
    assert log_seqs(m.models, NAME) == [1, 2] and champion_version(m) == winner


# ---------------------------------------------------------------------------------------------- bad input


def _delete_version(m, step: int) -> None:
    store = open_store(m.uri[step])
    for o in list(store.list("")):
        store.delete(o.key)


def test_a_champion_that_was_deleted_is_reported_with_a_rollback_offered_and_nothing_moves(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    promote(cfg, m.uri[2], scores(m, 2, probe=0.6))
    _delete_version(m, 2)
    before = pointer_bytes(m.models, NAME)
    with pytest.raises(ChampionDamaged, match=rf"{m.version[2]}, is damaged: it was deleted .* nothing was moved") as e:
        promote(cfg, m.uri[3], scores(m, 3, probe=0.9))
    assert e.value.rollback_to == [m.version[1]] and f"m3i promote --to {m.version[1]}" in str(e.value)
    assert pointer_bytes(m.models, NAME) == before and log_seqs(m.models, NAME) == [1, 2]
    assert "deleted" in list_versions(m.models, NAME).champion_problem
    rollback(m.models, NAME, e.value.rollback_to[0], "v2 was deleted")  # what the message offers works
    assert promote(cfg, m.uri[3], scores(m, 3, probe=0.9)).promoted


def test_a_champion_whose_weights_changed_is_reported(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    store = open_store(m.uri[1])
    data = bytearray(store.get_bytes("model.safetensors"))
    data[-1] ^= 0xFF  # same size, other bytes
    store.put_bytes("model.safetensors", bytes(data))
    with pytest.raises(ChampionDamaged, match="model.safetensors is damaged: sha256 .* no intact version is left") as e:
        promote(cfg, m.uri[2], scores(m, 2, probe=0.9))
    assert e.value.rollback_to == [] and log_seqs(m.models, NAME) == [1]


def test_a_candidate_without_scores_is_a_clear_error_and_nothing_moves(m):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    before = pointer_bytes(m.models, NAME)
    with pytest.raises(ValueError, match="holds no scores"):
        promote(cfg, m.uri[2], {"model": {"uri": m.uri[2]}, "data": {"shards": m.ds}})
    with pytest.raises(ValueError, match="do not exist; run `m3i evaluate` on the candidate first"):
        promote(cfg, m.uri[2], join_uri(m.root, "evals", "never-written"))
    with pytest.raises(ValueError, match="names no eval data set"):
        promote(cfg, m.uri[2], {**scores(m, 2, probe=0.9), "data": {}})
    with pytest.raises(ValueError, match=rf"are of {m.uri[3]}, not of the candidate"):
        promote(cfg, m.uri[2], scores(m, 3, probe=0.9))
    with pytest.raises(ValueError, match="cannot fingerprint the eval data set"):
        promote(cfg, m.uri[2], scores(m, 2, probe=0.9, ds=join_uri(m.root, "no-such-data")))
    with pytest.raises(ValueError, match="already is the champion"):
        promote(cfg, m.uri[1], scores(m, 1, probe=0.9))
    with pytest.raises(ValueError, match="has no version"):
        promote(cfg, join_uri(m.models, NAME, "v00000009-00000000"), scores(m, 2, probe=0.9))
    assert pointer_bytes(m.models, NAME) == before and log_seqs(m.models, NAME) == [1]


def test_a_policy_naming_a_score_the_evaluation_lacks_is_a_clear_error_and_nothing_moves(m):
    with pytest.raises(ValueError, match=r"promote.guards='knn.top7' is not a known score; choose one of \["):
        promote_cfg("promote.guards=[knn.top7]")
    cfg = promote_cfg("promote.guards=[finetune.top1]")
    with pytest.raises(ValueError, match=r"has no score \['finetune.top1'\]"):
        promote(cfg, m.uri[1], scores(m, 1, probe=0.9))
    assert pointer_bytes(m.models, NAME) is None and log_seqs(m.models, NAME) == []


def test_a_damaged_candidate_is_refused(m):
    store = open_store(m.uri[1])
    store.delete("README.md")
    with pytest.raises(ValueError, match=r"candidate v00000001-\w+ is damaged: .*README.md is missing"):
        promote(promote_cfg(), m.uri[1], scores(m, 1, probe=0.9))


def test_a_pointer_that_lags_the_log_or_is_unreadable_gives_way_to_the_log(m, caplog):
    cfg = promote_cfg()
    promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    plan = decide(cfg, m.uri[2], scores(m, 2, probe=0.6))
    plan.ledger.write_pointer = lambda record: False  # a writer that dies between its log entry and the pointer
    commit(plan)
    assert Ledger(m.models, NAME).pointer().ref.version == m.version[1]  # the pointer lags ...
    state = Ledger(m.models, NAME).state()
    assert state.champion.ref.version == m.version[2] and not state.pointer_current  # ... the log does not
    r = promote(cfg, m.uri[3], scores(m, 3, probe=0.55))
    assert not r.promoted and r.champion_before.ref.version == m.version[2]  # gated against the true champion
    assert promote(cfg, m.uri[4], scores(m, 4, probe=0.7)).promoted
    assert Ledger(m.models, NAME).pointer().ref.version == m.version[4]  # and the next promotion rewrites it
    open_store(join_uri(m.models, NAME)).put_bytes("champion.json", b"{not json")
    assert Ledger(m.models, NAME).state().champion.ref.version == m.version[4]
    assert "champion.json is unreadable" in caplog.text


def test_a_stale_pointer_write_never_moves_the_pointer_back(m):
    cfg = promote_cfg()
    first = promote(cfg, m.uri[1], scores(m, 1, probe=0.5))
    promote(cfg, m.uri[2], scores(m, 2, probe=0.6))
    assert not Ledger(m.models, NAME).write_pointer(first.champion)  # event 1's record after event 2's
    assert Ledger(m.models, NAME).pointer().ref.version == m.version[2]


# ---------------------------------------------------------------------------------------------- re-evaluation


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.helpers import shard_small, small_demo

    root = tmp_path_factory.mktemp("promote-shards")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


def _eval_overrides(model: str, out: str, shards: str) -> list[str]:
    return [f"evaluate.model={model}", f"evaluate.out={out}", f"data.shards={shards}", "evaluate.probe_epochs=5",
            "evaluate.batch_size=16", "evaluate.k=5", "promote.random_init_floor=false"]


@pytest.mark.slow
def test_the_champion_is_re_evaluated_when_the_eval_sets_differ(tmp_path, exported, shards, monkeypatch):
    from m3i.evaluate import evaluate

    src, versions = exported
    models = tmp_path / "models"
    shutil.copytree(src, models / NAME)
    uri = {k: str(models / NAME / v) for k, v in versions.items()}
    other_data = fake_dataset(str(tmp_path / "older-eval-data"))
    # the champion was scored on another (older) eval set
    promote(promote_cfg(), uri[1], metrics_doc(uri[1], other_data, 0.9, 0.9))

    cfg = promote_cfg(*_eval_overrides(uri[2], str(tmp_path / "evals" / "2"), shards))
    evaluate(cfg)
    r = promote(cfg, uri[2], str(tmp_path / "evals" / "2"))
    fp = r.event.eval_set.fingerprint
    assert r.reevaluated == str(models / NAME / "promotions" / "evals" / f"{versions[1]}-{fp[:16]}")
    assert Path(r.reevaluated, "metrics.json").is_file() and r.event.reevaluated == r.reevaluated
    # the champion's scores the gate used are those of m3i evaluate of the champion on the candidate's eval set
    direct = evaluate(promote_cfg(*_eval_overrides(uri[1], str(tmp_path / "direct"), shards), "evaluate.random_init=false"))
    assert r.event.champion_before_scores["probe.top1"] == direct.metrics["probe"]["top1"] != 0.9
    assert r.event.champion_before_scores["knn.top1"] == direct.metrics["knn"]["top1"]
    assert r.promoted == (r.event.scores["probe.top1"] > direct.metrics["probe"]["top1"])
    assert f"re-evaluated on the candidate's eval set: `{r.reevaluated}`" in r.report

    # The next gate on that eval set evaluates nothing: the old champion's re-evaluation is reused, a new
    # champion's recorded scores are on this eval set already.
    monkeypatch.setattr("m3i.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    doc = {**direct.metrics, "model": {**direct.metrics["model"], "uri": uri[3]}, "random_init": None}
    again = promote(cfg, uri[3], doc, dry_run=True)
    assert again.reevaluated == ("" if r.promoted else r.reevaluated)
    assert again.decision.champion == (versions[2] if r.promoted else versions[1])


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.prometheus
def test_promotion_metrics_reach_the_pushgateway(m, pushgateway):  # noqa: F811 - the fixture
    cfg = promote_cfg(f"promote.pushgateway={pushgateway.url}")
    assert promote(cfg, m.uri[1], scores(m, 1, probe=0.5)).pushed
    promote(cfg, m.uri[2], scores(m, 2, probe=0.4))
    last = promote(cfg, m.uri[3], scores(m, 3, probe=0.45))
    assert last.pushed and not last.promoted
    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=5) as resp:
        pushed = {k: v for k, v in parse_metrics(resp.read().decode()).items() if ("job", "m3i-promote") in k[1]}
    labels = {("job", "m3i-promote"), ("model", NAME), ("instance", "")}

    def value(name, **extra):
        return pushed.get((name, frozenset(labels | set(extra.items()))))

    assert value("m3i_promote_decisions_total", action="promote") == 1
    assert value("m3i_promote_decisions_total", action="reject") == 2
    assert value("m3i_promote_decisions_total", action="rollback") == 0
    assert value("m3i_promote_consecutive_rejections") == 2
    assert value("m3i_promote_champion_info", version=m.version[1], previous="") == 1
    assert value("m3i_promote_champion_timestamp_seconds") == pytest.approx(Ledger(m.models, NAME).pointer().unix)
    r = rollback(m.models, NAME, m.version[2], "testing", policy=cfg.promote)
    assert r.pushed
    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=5) as resp:
        pushed = {k: v for k, v in parse_metrics(resp.read().decode()).items() if ("job", "m3i-promote") in k[1]}
    assert value("m3i_promote_consecutive_rejections") == 0 and value("m3i_promote_decisions_total", action="rollback") == 1
    assert value("m3i_promote_champion_info", version=m.version[2], previous=m.version[1]) == 1


def test_an_unreachable_pushgateway_is_only_a_warning(m, caplog):
    from tests.conftest import free_port

    r = promote(promote_cfg(f"promote.pushgateway=http://127.0.0.1:{free_port()}"), m.uri[1], scores(m, 1, probe=0.5))
    assert r.promoted and r.pushed is False and "pushing the promotion metrics of m" in caplog.text


def test_promote_error_is_the_base_of_state_errors():
    assert issubclass(PromotionConflict, PromoteError) and issubclass(ChampionDamaged, PromoteError)


def test_the_same_images_sharded_again_are_the_same_eval_set(tmp_path):
    """A re-shard of the same images writes a new index.json (its run record differs) but the same
    shards: the scores stay comparable, so the champion is not re-evaluated for nothing."""
    from m3i.artifacts import evaluation_from_metrics

    first, again, other = (str(tmp_path / n) for n in ("first", "again", "other"))
    fake_dataset(first, "a"), fake_dataset(again, "a"), fake_dataset(other, "b")
    store = open_store(again)
    store.write_json("index.json", {**store.read_json("index.json"), "run": {"seconds": 12.5, "units_reused": 3}})
    assert open_store(first).sha256("index.json") != store.sha256("index.json")

    def fingerprint(shards: str, **data) -> str:
        doc = metrics_doc("m", shards, 0.5, 0.5)
        doc["data"].update(data)
        return evaluation_from_metrics(doc).eval_set.fingerprint

    assert fingerprint(first) == fingerprint(again) != fingerprint(other)
    # what m3i evaluate recorded it scored on wins over the data set as it is now
    recorded = evaluation_from_metrics(metrics_doc("m", other, 0.5, 0.5)).eval_set.content_sha256
    assert fingerprint(first, content_sha256=recorded) == fingerprint(other)


def test_a_garbled_index_is_a_damaged_data_set(tmp_path):
    from m3i.artifacts import DamagedArtifactError, read_index

    store = open_store(str(tmp_path))
    store.write_json("index.json", {"format": "m3i-shards", "format_version": 1, "classes": []})
    with pytest.raises(DamagedArtifactError, match="index.json is damaged: .*'splits'"):
        read_index(store)
