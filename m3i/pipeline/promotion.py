"""The pipeline's promotion steps: where training starts, the gate, and the record of its decision.

    start = start_point("s3://m3i/models", "m3i", start_from_champion=True)   # -> train's overrides
    g = gate_model(model_manifest, "s3://m3i/evals/r1/metrics.json", "s3://m3i/models")
    if g["decision"] == "promote": record_decision(...)                        # the dsl.If of the pipeline

The gate decides and records nothing (its report is the step's Markdown in the KFP UI); the
promote step under the pipeline's ``dsl.If`` commits: it moves the champion pointer for a
``promote`` and records a ``reject`` (the rejected version stays where export put it). It decides
again first, against the log as it is then: when another run changed the champion between the
two steps the fresh decision is the one recorded (and logged), so the log never holds a
decision made against a stale champion. A retried step finds its own event (same KFP run,
same candidate) and returns it instead of recording a second one.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from m3i.config import override_strings
from m3i.pipeline.steps import step_config
from m3i.storage import join_uri

__all__ = ["DECISIONS", "gate_model", "record_decision", "start_point"]

log = logging.getLogger(__name__)

DECISIONS = ("promote", "reject", "champion")
"""What the gate step returns: promote the candidate, reject it, or nothing to decide (it already is the champion)."""


def start_point(
    models_uri: str, model_name: str, *, start_from_champion: bool, preset: str = "", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Where the train step starts: the model's champion (``train.init_from``) when asked and there is one.

    Resolved when the run runs, not when the pipeline is compiled: the champion of the moment.

    Returns:
        ``overrides`` (the pipeline's, plus ``train.init_from=<champion's export>`` when it starts
        from the champion), ``init_from`` (that URI or empty), ``champion`` (the version or empty)
        and ``reason``.

    Raises:
        ValueError: ``start_from_champion`` with an ``overrides`` entry of its own for ``train.init_from``.
        m3i.promote.ChampionDamaged: The champion's version is deleted or damaged.
    """
    from m3i.promote import champion_of

    step_config(preset, overrides)  # bad overrides fail here, with the key named, before training
    out: dict[str, Any] = {"overrides": list(overrides), "init_from": "", "champion": "", "reason": ""}
    if not start_from_champion:
        out["reason"] = "start_from_champion is off: random initialisation (or the overrides' train.init_from)"
        return out
    if any(o.split("=", 1)[0].strip() == "train.init_from" for o in overrides):
        raise ValueError("start_from_champion=true and an override train.init_from=... both say where training starts; keep one")
    if not model_name:
        out["reason"] = "no model_name: no champion to start from, random initialisation"
        return out
    champion = champion_of(models_uri, model_name)
    if champion is None:
        out["reason"] = f"model {model_name!r} has no champion yet: random initialisation"
        return out
    out.update(
        overrides=[*overrides, *override_strings({"train.init_from": champion.ref.uri})], init_from=champion.ref.uri, champion=champion.ref.version,
        reason=f"continued pre-training from the champion {champion.ref.version} (step {champion.ref.step}, {champion.action} #{champion.seq})",
    )
    return out


def _scalars(primary: str, decision: Any, scores: dict[str, float], theirs: dict[str, float] | None) -> dict[str, float]:
    """The decision as KFP metrics: 1/0, and the primary score of both with the delta."""
    key = primary.replace(".", "_")
    out = {"promote": 1.0 if decision.promote else 0.0, "has_champion": 0.0 if theirs is None else 1.0}
    out[f"candidate_{key}"] = float(scores[primary])
    if theirs is not None and primary in theirs:
        out[f"champion_{key}"] = float(theirs[primary])
        out[f"delta_{key}"] = float(scores[primary] - theirs[primary])
    return out


def gate_model(
    model: dict[str, Any], metrics_uri: str, models_uri: str, *, kfp_run_id: str = "", preset: str = "",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The gate of the exported ``model`` (the export step's manifest) scored by ``metrics_uri``; records nothing.

    Returns:
        ``decision`` (one of :data:`DECISIONS`), ``reasons``, ``report`` (Markdown), ``scalars`` (for
        KFP Metrics), ``candidate``, ``champion`` (its version or empty) and ``reevaluated``.

    Raises:
        ValueError: Scores missing or without what the policy reads; a policy naming an unknown score.
        m3i.promote.ChampionDamaged: The champion's version is deleted or damaged (a rollback is offered).
    """
    from m3i.promote import Ledger, RunInfo, decide

    cfg, _ = step_config(preset, overrides)
    name, version = model["name"], model["version"]
    current = Ledger(models_uri, name).state().champion  # decide() checks its version; no need to read it twice
    if current is not None and current.ref.version == version:
        why = f"{version} already is the champion of {name} ({current.action} #{current.seq} at {current.at}); nothing to decide"
        report = f"# Promotion gate of {name}: nothing to decide\n\n- {why}\n"
        return {"decision": "champion", "reasons": [why], "report": report, "scalars": {"promote": 0.0, "has_champion": 1.0},
                "candidate": model["uri"], "champion": version, "reevaluated": ""}
    plan = decide(cfg, join_uri(models_uri, name, version), metrics_uri, run=RunInfo(kfp_run_id=kfp_run_id))
    d = plan.decision
    return {
        "decision": d.outcome, "reasons": d.reasons, "report": plan.report,
        "scalars": _scalars(cfg.promote.primary, d, plan.evaluation.scores, plan.champion_scores),
        "candidate": plan.candidate.uri, "champion": plan.champion.ref.version if plan.champion else "",
        "reevaluated": plan.reevaluated,
    }


def _recorded(models_uri: str, name: str, version: str, kfp_run_id: str) -> Any:
    """This KFP run's event about ``version``, when a retried step recorded it already."""
    from m3i.promote import Ledger

    if not kfp_run_id:
        return None
    for event in Ledger(models_uri, name).events(newest_first=True):
        if event.candidate.version == version and event.run.kfp_run_id == kfp_run_id and event.action in ("promote", "reject"):
            return event
    return None


def record_decision(
    model: dict[str, Any], metrics_uri: str, models_uri: str, *, expected: str, kfp_run_id: str = "", fail_on_reject: bool = False,
    preset: str = "", overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Decide again and record it: move the champion pointer (promote) or log the rejection.

    Args:
        model: The export step's manifest.
        metrics_uri: The candidate's ``metrics.json``.
        models_uri: The export root (``<storage_uri>/models``).
        expected: What the gate step decided (``promote`` or ``reject``).
        kfp_run_id: The KFP run, recorded with the event (and how a retried step finds its own).
        fail_on_reject: Raise after recording a rejection (the run fails).
        preset, overrides: The step's config (``promote`` policy, mirrors).

    Returns:
        ``decision``, ``reasons``, ``seq`` (the log event), ``champion`` (the version after), ``moved``,
        ``registered`` and ``pushed`` (``None`` when that mirror is off).

    Raises:
        RuntimeError: Rejected while ``fail_on_reject`` (recorded first).
        m3i.promote.PromotionConflict: Another promotion of the model took the log entry; the step's retry decides again.
    """
    from m3i.promote import RunInfo, promote

    if expected not in ("promote", "reject"):
        raise ValueError(f"expected={expected!r}; the gate's decisions that are recorded are 'promote' and 'reject'")
    name, version = model["name"], model["version"]
    done = _recorded(models_uri, name, version, kfp_run_id)
    if done is not None:
        log.info("event #%d of %s (%s %s) is this run's already: not recording it twice", done.seq, name, done.action, version)
        out = {"decision": done.action, "reasons": list((done.decision or {}).get("reasons", [])), "seq": done.seq,
               "champion": (done.champion.ref.version if done.champion else (done.champion_before.version if done.champion_before else "")),
               "moved": done.champion is not None, "registered": None, "pushed": None}
    else:
        cfg, _ = step_config(preset, overrides)
        r = promote(cfg, join_uri(models_uri, name, version), metrics_uri, run=RunInfo(kfp_run_id=kfp_run_id))
        if r.decision.outcome != expected:
            log.warning("the champion of %s changed since the gate (now %s): %s is now a %s, and recorded so",
                        name, r.champion_before.ref.version if r.champion_before else "none", version, r.decision.outcome)
        out = {"decision": r.decision.outcome, "reasons": r.decision.reasons, "seq": r.event.seq,
               "champion": r.champion.ref.version if r.champion else "", "moved": r.promoted,
               "registered": r.registered, "pushed": r.pushed}
    if out["decision"] == "reject" and fail_on_reject:
        raise RuntimeError(
            f"{name} {version} was rejected (event #{out['seq']}; fail_on_reject is on): " + "; ".join(out["reasons"])
        )
    return out
