"""The promotion gate as a pure function, its policy section, and its Markdown report."""

from __future__ import annotations

import copy

import pytest

from m3i.config import PromoteConfig, load_config
from m3i.config.promote import SCORES
from m3i.promote import Scored, gate

FP = "f" * 64


def scored(version: str, probe: float, knn: float = 0.5, base: float | None = 0.2, fp: str = FP, **more: float) -> Scored:
    scores = {"probe.top1": probe, "knn.top1": knn, **more}
    random_init = {} if base is None else {"probe.top1": base, "knn.top1": base}
    return Scored(version, scores, random_init, fp)


def policy(**kw) -> PromoteConfig:
    return PromoteConfig(**kw)


# ---------------------------------------------------------------------------------------------- no champion


def test_without_a_champion_only_the_floors_apply():
    d = gate(scored("v2", probe=0.3), None, policy())
    assert d.promote and d.champion is None and [c.kind for c in d.checks] == ["random_init"]
    assert d.reasons[0] == "no champion yet: only the floors apply"


def test_the_primary_must_beat_its_own_random_init_by_the_margin():
    assert not gate(scored("v2", probe=0.2, base=0.2), None, policy()).promote  # no better than chance
    d = gate(scored("v2", probe=0.3, base=0.2), None, policy(random_init_margin=0.1))  # exactly the margin: not more
    assert not d.promote and "must be more than +10.00 points: fails" in d.reasons[-1]
    assert gate(scored("v2", probe=0.31, base=0.2), None, policy(random_init_margin=0.1)).promote
    assert gate(scored("v2", probe=0.1, base=0.2), None, policy(random_init_floor=False)).promote


def test_absolute_floors_apply_with_and_without_a_champion():
    p = policy(floors=("probe.top1>=0.5", "knn.top1>=0.4"))
    d = gate(scored("v2", probe=0.49, knn=0.4), None, p)
    assert not d.promote and d.reasons == ["no champion yet: only the floors apply", "probe.top1 49.00 % must be at least 50.00 %: fails"]
    assert gate(scored("v2", probe=0.5, knn=0.4), None, p).promote  # at least: the floor itself passes
    # a big gain over the champion does not excuse a floor
    assert not gate(scored("v3", probe=0.49, knn=0.45), scored("v2", probe=0.1, knn=0.1), p).promote


# ---------------------------------------------------------------------------------------------- against a champion


def test_a_better_candidate_is_promoted_and_a_worse_or_equal_one_is_not():
    champion = scored("v1", probe=0.6, knn=0.5)
    better = gate(scored("v2", probe=0.62, knn=0.5), champion, policy())
    assert better.promote and better.champion == "v1" and better.outcome == "promote"
    assert [c.kind for c in better.checks] == ["random_init", "primary", "guard"]
    assert len(better.reasons) == 3  # a promotion lists every check that it passed
    worse = gate(scored("v2", probe=0.58, knn=0.5), champion, policy())
    assert not worse.promote and worse.outcome == "reject"
    assert worse.reasons == ["probe.top1 58.00 % vs the champion's 60.00 %: -2.00 points, must be more than +0.00 points: fails"]
    assert not gate(scored("v2", probe=0.6, knn=0.5), champion, policy()).promote  # equal is not better


def test_min_delta_is_a_strict_margin_and_max_drop_an_inclusive_one():
    champion = scored("v1", probe=0.50, knn=0.50)
    p = policy(min_delta=0.01, max_drop=0.02)
    assert not gate(scored("v2", probe=0.51, knn=0.50), champion, p).promote  # one point is not more than one point
    assert gate(scored("v2", probe=0.52, knn=0.50), champion, p).promote
    # 0.50 - 0.48 is 0.020000000000000018 in floats: still a drop of exactly max_drop, allowed
    assert gate(scored("v2", probe=0.52, knn=0.48), champion, p).promote
    d = gate(scored("v2", probe=0.52, knn=0.47), champion, p)
    assert not d.promote and d.reasons == ["knn.top1 47.00 % vs the champion's 50.00 %: -3.00 points, may fall at most +2.00 points: fails"]


def test_every_guard_is_checked():
    champion = scored("v1", probe=0.5, knn=0.5, **{"probe.top5": 0.9, "feature_std.eval": 0.6})
    p = policy(guards=("knn.top1", "probe.top5", "feature_std.eval"), max_drop=0.05)
    cand = scored("v2", probe=0.6, knn=0.5, **{"probe.top5": 0.8, "feature_std.eval": 0.1})
    d = gate(cand, champion, p)
    assert not d.promote and [c.score for c in d.checks if not c.passed] == ["probe.top5", "feature_std.eval"]
    assert "feature_std.eval 0.1000 vs the champion's 0.6000: -0.5000" in d.reasons[1]


def test_scores_on_different_eval_sets_are_not_compared():
    with pytest.raises(ValueError, match="scored on another eval set .* re-evaluate the champion"):
        gate(scored("v2", probe=0.9), scored("v1", probe=0.1, fp="0" * 64), policy())


def test_the_gate_is_pure():
    cand, champ = scored("v2", probe=0.62), scored("v1", probe=0.6)
    before = (copy.deepcopy(cand), copy.deepcopy(champ))
    assert gate(cand, champ, policy()) == gate(cand, champ, policy())
    assert (cand, champ) == before


# ---------------------------------------------------------------------------------------------- bad input


def test_a_score_the_policy_names_but_the_candidate_lacks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"candidate v2 has no score \['finetune.top1'\] \(it has \['knn.top1', 'probe.top1'\]\)"):
        gate(scored("v2", probe=0.6), None, policy(guards=("finetune.top1",)))
    with pytest.raises(ValueError, match=r"champion v1 has no score \['knn.top5'\]"):
        gate(scored("v2", probe=0.6, **{"knn.top5": 0.9}), scored("v1", probe=0.5), policy(guards=("knn.top5",)))


def test_a_candidate_without_its_random_init_baseline_is_refused_while_the_floor_is_on():
    with pytest.raises(ValueError, match="without the random-init baseline of probe.top1 .* promote.random_init_floor=false"):
        gate(scored("v2", probe=0.6, base=None), None, policy())
    assert gate(scored("v2", probe=0.6, base=None), None, policy(random_init_floor=False)).promote


@pytest.mark.parametrize(
    "override, message",
    [
        ("promote.primary=probe.top2", r"promote.primary='probe.top2' is not a known score; choose one of \['knn.top1'"),
        ("promote.guards=[knn.top1, knn.top9]", r"promote.guards='knn.top9' is not a known score; choose one of"),
        ("promote.guards=[probe.top1]", r"promote.guards=\['probe.top1'\] holds the primary score"),
        ("promote.floors=[probe.top1>0.3]", r"promote.floors entry 'probe.top1>0.3' is not allowed; write <score>>=<number>"),
        ("promote.floors=[probe.top9>=0.3]", r"score='probe.top9' is not a known score"),
        ("promote.floors=[probe.top1>=0.3, probe.top1>=0.4]", r"names a score twice"),
        ("promote.min_delta=-0.1", r"promote.min_delta=-0.1 is out of range; allowed \[0.0, 1.0\]"),
        ("promote.max_drop=2", r"promote.max_drop=2.0 is out of range"),
        ("promote.primary=finetune.top1", r"promote.primary='finetune.top1' is not scored at random init"),
        ("promote.pushgateway=not a url", r"promote.pushgateway='not a url' is not a URL"),
        ("promote.registry.url=ftp://registry", r"promote.registry.url='ftp://registry' is not allowed"),
        ("promote.registry.url=http://registry:8080/api", r"without a path"),
        ("promote.registry.token_env=eyJhbGciOiJSUzI1NiJ9.e30.c2ln", r"promote.registry.token_env is not an environment variable name"),
        ("promote.color=red", r"promote: unknown key\(s\) \['color'\]"),
    ],
)
def test_bad_policy_values_raise_value_error_naming_them(override, message):
    with pytest.raises(ValueError, match=message) as e:
        load_config(None, None, [override])
    assert "eyJhbGci" not in str(e.value)  # a token pasted into the config is never echoed


def test_policy_defaults_and_overrides():
    p = load_config(None, None, ["promote.floors=[probe.top1>=0.3]", "promote.guards=[knn.top1, feature_std.eval]",
                                 "promote.registry.url=https://mr.kubeflow:8443"]).promote
    assert p.primary == "probe.top1" and p.floor_values() == {"probe.top1": 0.3}
    assert p.guards == ("knn.top1", "feature_std.eval") and p.registry.token_env == "M3I_MODEL_REGISTRY_TOKEN"
    assert PromoteConfig().registry.url == ""  # the Model Registry mirror is off by default
    assert set(SCORES) >= {"probe.top1", "knn.top1", "finetune.top1", "feature_std.eval"}


def test_the_report_shows_every_score_of_both_with_its_delta(tmp_path):
    from m3i.promote import EvalSet, Evaluation, VersionRef, render_decision

    p = policy(floors=("knn.top5>=0.5",))
    ev = Evaluation({"probe.top1": 0.62, "knn.top1": 0.5, "knn.top5": 0.9, "feature_std.eval": 0.7}, {"probe.top1": 0.2},
                    EvalSet("/data/eval", "a" * 64, "train", "eval"))
    champion_scores = {"probe.top1": 0.6, "knn.top1": 0.55, "knn.top5": 0.8, "feature_std.eval": 0.65}
    d = gate(Scored("v2", ev.scores, ev.random_init, ev.eval_set.fingerprint), Scored("v1", champion_scores, {}, ev.eval_set.fingerprint), p)
    ref = VersionRef("m", "v2", "/models/m/v2", "b" * 64, "c" * 64, 2, "run-2", "abc123")
    text = render_decision(d, ref, ev, None, champion_scores, p)
    assert text.startswith("# Promotion gate of m: REJECT v2")
    assert "| `probe.top1` | 62.00 % | 60.00 % | +2.00 | 20.00 % |" in text
    assert "| `knn.top1` | 50.00 % | 55.00 % | -5.00 | - |" in text
    assert "| `knn.top5` | 90.00 % | 80.00 % | +10.00 | - |" in text
    assert "| `feature_std.eval` | 0.7000 | 0.6500 | +0.0500 | - |" in text
    assert "| guard | `knn.top1` | 50.00 % | 55.00 % | -5.00 | +2.00 | FAIL |" in text
    assert "- knn.top1 50.00 % vs the champion's 55.00 %: -5.00 points, may fall at most +2.00 points: fails" in text
