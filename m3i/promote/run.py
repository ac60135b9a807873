"""``m3i promote``: gate a new version against its model's champion and move the pointer; roll back; list.

    result = promote(cfg, "s3://m3i/models/m3i-demo/v00000300-1a2b3c4d", "s3://m3i/evals/run-7")
    result.promoted, result.decision.reasons, result.report          # Markdown: candidate vs champion
    rollback("s3://m3i/models", "m3i-demo", "v00000200-9f8e7d6c", "the new one mislabels cats")
    list_versions("s3://m3i/models", "m3i-demo").markdown()

:func:`promote` is :func:`decide` (read the state, re-evaluate the champion when it was scored on
another eval set, gate) then :func:`commit` (record the event, move the pointer when promoted). A
rejected candidate is recorded too; a dry run records nothing. See :mod:`m3i.promote.ledger` for
what two concurrent promotions do.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from m3i.artifacts.errors import DamagedArtifactError
from m3i.artifacts.evaluation import EvalSet, Evaluation, evaluation_from_metrics, read_evaluation
from m3i.artifacts.export import MANIFEST
from m3i.config import Config, to_dict
from m3i.config.promote import PromoteConfig
from m3i.promote.errors import ChampionDamaged, PromoteError
from m3i.promote.gate import Decision, Scored, gate
from m3i.promote.ledger import EVALS, Ledger
from m3i.promote.records import ChampionRecord, Event, RunInfo, VersionRef, VersionRow, read_version, version_problem
from m3i.promote.reevaluate import reevaluate
from m3i.promote.report import render_decision, render_versions
from m3i.storage import join_uri, open_store

__all__ = [
    "ModelVersions", "Plan", "PromotionResult", "RollbackResult", "champion_of", "commit", "decide", "list_versions",
    "promote", "rollback",
]

log = logging.getLogger(__name__)

_EXPORT = re.compile(r"^(v\d{8}-[0-9a-f]{8})/export\.json$")
_ROLLBACK_OFFERS = 5


@dataclass(frozen=True)
class Plan:
    """What :func:`decide` found; :func:`commit` records it."""

    ledger: Ledger
    candidate: VersionRef
    evaluation: Evaluation
    champion: ChampionRecord | None
    champion_scores: dict[str, float] | None
    """The champion's scores on the candidate's eval set."""
    reevaluated: str
    """Where the champion was re-evaluated for this; empty when its recorded scores were on the same eval set."""
    decision: Decision
    seq: int
    """The log number the event will take."""
    policy: PromoteConfig
    run: RunInfo
    report: str
    """Markdown: candidate vs champion."""


@dataclass(frozen=True)
class PromotionResult:
    """What :func:`promote` did."""

    decision: Decision
    candidate: VersionRef
    champion_before: ChampionRecord | None
    champion: ChampionRecord | None
    """The champion now: the candidate when promoted, else the one before."""
    event: Event | None
    """The log entry written; ``None`` for a dry run."""
    report: str
    reevaluated: str
    dry_run: bool
    registered: bool | None = None
    """Whether the Model Registry mirror succeeded; ``None`` when it is off or for a dry run."""
    pushed: bool | None = None
    """Whether the Pushgateway push succeeded; ``None`` when it is off or for a dry run."""

    @property
    def promoted(self) -> bool:
        """Whether the pointer moved to the candidate."""
        return self.decision.promote and not self.dry_run


@dataclass(frozen=True)
class RollbackResult:
    """What :func:`rollback` did."""

    champion: ChampionRecord
    previous: ChampionRecord | None
    event: Event
    registered: bool | None = None
    pushed: bool | None = None


@dataclass(frozen=True)
class ModelVersions:
    """Every exported version of a model, newest first, and its champion."""

    name: str
    models_uri: str
    rows: list[VersionRow]
    champion: ChampionRecord | None
    champion_problem: str | None
    """What is wrong with the champion's version (deleted, changed, files missing); ``None`` when intact."""

    def markdown(self, primary: str = "probe.top1") -> str:
        """The listing as a Markdown table (see :func:`m3i.promote.report.render_versions`)."""
        text = render_versions(self.name, self.rows, primary)
        if self.champion is None:
            return text + "\nNo champion yet.\n"
        note = f"\nChampion: `{self.champion.ref.version}` ({self.champion.action} #{self.champion.seq} at {self.champion.at})"
        return text + note + (f"; DAMAGED: {self.champion_problem}\n" if self.champion_problem else ".\n")


def _split(candidate: str) -> tuple[str, str, str]:
    """``<models>/<name>/<version>`` -> its three parts."""
    rest, _, version = candidate.rstrip("/").rpartition("/")
    models, _, name = rest.rpartition("/")
    if not models or not name or not version:
        raise ValueError(f"candidate {candidate!r} is not an export version folder <out>/<name>/<version>")
    return models, name, version


def _now() -> tuple[str, float]:
    unix = time.time()
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), unix


def _rollback_offers(ledger: Ledger, broken: ChampionRecord) -> list[str]:
    """Intact earlier champions, the one the broken champion replaced first."""
    seen, offers = {broken.ref.version}, []
    refs = [broken.previous] if broken.previous else []
    refs += [e.champion.ref for e in ledger.events(newest_first=True) if e.champion is not None]
    for ref in refs:
        if ref is None or ref.version in seen:
            continue
        seen.add(ref.version)
        if version_problem(ref, full=False) is None:
            offers.append(ref.version)
        if len(offers) >= _ROLLBACK_OFFERS:
            break
    return offers


def champion_of(models_uri: str, name: str) -> ChampionRecord | None:
    """The champion of model ``name`` under ``models_uri`` now; ``None`` when it has none yet.

    What a retrain starts from (the pipeline's ``start_from_champion``): the version is checked
    first, so a deleted or damaged champion is reported, never trained from.

    Raises:
        ChampionDamaged: Its version is deleted or damaged; the error names intact versions to roll back to.
    """
    ledger = Ledger(models_uri, name)
    champion = ledger.state().champion
    if champion is not None:
        problem = version_problem(champion.ref)
        if problem:
            raise ChampionDamaged(name, champion.ref.version, problem, _rollback_offers(ledger, champion))
    return champion


def _check_scores_are_the_candidates(evaluation: Evaluation, ref: VersionRef) -> None:
    """Scores that say which model they are of must be of the candidate."""
    if evaluation.model and evaluation.model.rstrip("/") != open_store(ref.uri).uri.rstrip("/"):
        raise ValueError(f"the scores given ({evaluation.source or 'metrics'}) are of {evaluation.model}, not of the candidate {ref.uri}")


def decide(cfg: Config, candidate: str, metrics: Mapping[str, Any] | str, *, run: RunInfo = RunInfo()) -> Plan:
    """Gate ``candidate`` against its model's champion; writes nothing but a champion's re-evaluation.

    Args:
        cfg: The config: ``cfg.promote`` is the policy; ``cfg.evaluate`` runs a re-evaluation.
        candidate: The export version folder, ``<out>/<name>/<version>``.
        metrics: The candidate's ``metrics.json`` of ``m3i evaluate`` (its URI, its folder, or the dict).
        run: The run asking (training run id, KFP run id).

    Returns:
        The :class:`Plan`: the decision, its report, the log number to take.

    Raises:
        ValueError: A candidate that is not an intact export (a :class:`m3i.artifacts.DamagedArtifactError`), scores
            that are missing, not the candidate's, or lack what the policy names, or a candidate that already is the champion.
        ChampionDamaged: The champion pointer names a deleted or damaged version.
    """
    policy = cfg.promote
    models_uri, name, version = _split(candidate)
    ref = read_version(models_uri, name, version)
    problem = version_problem(ref)
    if problem:
        raise DamagedArtifactError(f"the candidate {ref.version} is damaged: {problem}")
    evaluation = read_evaluation(metrics)
    _check_scores_are_the_candidates(evaluation, ref)
    fingerprint = evaluation.eval_set.fingerprint
    mine = Scored(ref.version, evaluation.scores, evaluation.random_init, fingerprint)
    gate(mine, None, policy)  # the candidate's side first: a bad input fails before any re-evaluation
    ledger = Ledger(models_uri, name)
    state = ledger.state()
    champion, theirs, reevaluated = state.champion, None, ""
    if champion is not None:
        if champion.ref.version == ref.version:
            raise ValueError(f"{ref.version} already is the champion of {ref.name} (event #{champion.seq}); nothing to decide")
        problem = version_problem(champion.ref)
        if problem:
            raise ChampionDamaged(ref.name, champion.ref.version, problem, _rollback_offers(ledger, champion))
        if champion.eval_set is not None and champion.eval_set.fingerprint == fingerprint:
            theirs = dict(champion.scores)
        else:
            reevaluated = join_uri(ledger.uri, EVALS, f"{champion.ref.version}-{fingerprint[:16]}")
            theirs = reevaluate(cfg, champion, evaluation.eval_set, reevaluated).scores
    decision = gate(mine, Scored(champion.ref.version, theirs or {}, {}, fingerprint) if champion else None, policy)
    report = render_decision(decision, ref, evaluation, champion, theirs, policy, reevaluated=reevaluated)
    log.info("gate of %s %s: %s", ref.name, ref.version, "; ".join([decision.outcome, *decision.reasons]))
    return Plan(ledger, ref, evaluation, champion, theirs, reevaluated, decision, state.last_seq + 1, policy, run, report)


def _checks(decision: Decision) -> list[dict[str, Any]]:
    return [
        {"kind": c.kind, "score": c.score, "candidate": c.candidate, "reference": c.reference, "threshold": c.threshold, "passed": c.passed}
        for c in decision.checks
    ]


def _after(policy: PromoteConfig, ledger: Ledger, event: Event) -> tuple[bool | None, bool | None]:
    """The optional mirrors of a recorded event: Model Registry, Pushgateway (failures are warnings)."""
    registered = None
    if policy.registry.url:
        from m3i.promote.registry import mirror_event

        registered = mirror_event(policy.registry, event)
    pushed = None
    if policy.pushgateway:
        from m3i.promote.push import push_promotion_metrics

        pushed = push_promotion_metrics(policy.pushgateway, ledger)
    return registered, pushed


def commit(plan: Plan) -> PromotionResult:
    """Record ``plan``'s decision as event ``plan.seq`` and, when it promotes, move the pointer.

    Raises:
        PromotionConflict: Another event took ``plan.seq`` first (named in the error); nothing moved.
    """
    at, unix = _now()
    c, d, ev = plan.candidate, plan.decision, plan.evaluation
    run = RunInfo(plan.run.run_id or c.run_id, plan.run.kfp_run_id)
    record = None
    if d.promote:
        # Why it is champion: beating the champion's primary score, or (the first) clearing the floors.
        why = next((x.describe() for x in d.checks if x.kind == "primary"), "; ".join(d.reasons))
        record = ChampionRecord(
            c, plan.seq, "promote", at, unix, dict(ev.scores), dict(ev.random_init), ev.eval_set, run, why,
            plan.champion.ref if plan.champion else None,
        )
    event = Event(
        plan.seq, uuid.uuid4().hex, d.outcome, at, unix, c, dict(ev.scores), dict(ev.random_init), ev.eval_set,
        plan.champion.ref if plan.champion else None, plan.champion_scores, plan.reevaluated,
        {"outcome": d.outcome, "reasons": d.reasons, "checks": _checks(d)}, to_dict(plan.policy), run, "", record,
    )
    plan.ledger.append(event)
    if record is not None:
        plan.ledger.write_pointer(record)
    registered, pushed = _after(plan.policy, plan.ledger, event)
    return PromotionResult(
        d, c, plan.champion, record or plan.champion, event, plan.report, plan.reevaluated, False, registered, pushed,
    )


def promote(cfg: Config, candidate: str, metrics: Mapping[str, Any] | str, *, run: RunInfo = RunInfo(), dry_run: bool = False) -> PromotionResult:
    """Gate a new export version and, if it passes, make it its model's champion.

    Args:
        cfg: The config; ``cfg.promote`` is the policy (see :class:`m3i.config.PromoteConfig`).
        candidate: The export version folder, ``<out>/<name>/<version>`` (what ``m3i export`` printed).
        metrics: The candidate's scores: ``metrics.json`` of ``m3i evaluate`` (URI, folder, or dict).
        run: The run asking (training run id, KFP run id), recorded with the event.
        dry_run: Only decide: no event, no pointer move, no registry, no push (a champion
            re-evaluation is still written, and reused later).

    Returns:
        The :class:`PromotionResult`; ``result.promoted`` says whether the pointer moved.

    Raises:
        ValueError: Bad input (see :func:`decide`); nothing moved.
        ChampionDamaged: The champion names a deleted or damaged version; nothing moved.
        PromotionConflict: A concurrent promotion won the race; nothing moved.
    """
    plan = decide(cfg, candidate, metrics, run=run)
    if dry_run:
        return PromotionResult(plan.decision, plan.candidate, plan.champion, plan.champion, None, plan.report, plan.reevaluated, True)
    return commit(plan)


def _export_evaluation(ref: VersionRef) -> Evaluation | None:
    """The scores an export carries (``export.metrics`` put its evaluation into ``export.json``), if any."""
    try:
        doc = open_store(ref.uri).read_json(MANIFEST)
        return evaluation_from_metrics(doc["evaluation"]) if isinstance(doc.get("evaluation"), dict) else None
    except (ValueError, KeyError, OSError, RuntimeError):
        return None


def _known_scores(ledger: Ledger, version: str) -> tuple[dict[str, float], dict[str, float], EvalSet | None]:
    for e in ledger.events(newest_first=True):
        if e.candidate.version == version and e.scores:
            return e.scores, e.random_init, e.eval_set
    return {}, {}, None


def rollback(models_uri: str, name: str, to_version: str, reason: str, *, run: RunInfo = RunInfo(),
             policy: PromoteConfig | None = None) -> RollbackResult:
    """Make ``to_version`` the champion again, whatever the gate would say; recorded with ``reason``.

    Args:
        models_uri: The export root (``export.out``).
        name: The model.
        to_version: An intact exported version of it (``v00000200-9f8e7d6c``).
        reason: Why; required, recorded in the log and the pointer.
        run: Who asks (KFP run id), recorded.
        policy: Where to mirror and push (``registry``, ``pushgateway``); ``None`` mirrors nothing.

    Raises:
        ValueError: No reason, no such version, or it already is the champion.
        PromoteError: ``to_version`` is damaged.
        PromotionConflict: A concurrent event won the race; nothing moved.
    """
    if not reason.strip():
        raise ValueError("a rollback needs a reason (it is recorded in the promotion log)")
    ledger = Ledger(models_uri, name)
    ref = read_version(models_uri, name, to_version)
    problem = version_problem(ref)
    if problem:
        raise PromoteError(f"cannot roll {name!r} back to {to_version}: {problem}")
    state = ledger.state()
    current = state.champion
    if current is not None and current.ref.version == to_version:
        raise ValueError(f"{to_version} already is the champion of {name!r} (event #{current.seq}); nothing to roll back")
    scores, random_init, eval_set = _known_scores(ledger, to_version)
    if not scores and (exported := _export_evaluation(ref)) is not None:
        scores, random_init, eval_set = exported.scores, exported.random_init, exported.eval_set
    at, unix = _now()
    seq = state.last_seq + 1
    record = ChampionRecord(ref, seq, "rollback", at, unix, dict(scores), dict(random_init), eval_set, run, reason.strip(),
                            current.ref if current else None)
    event = Event(seq, uuid.uuid4().hex, "rollback", at, unix, ref, dict(scores), dict(random_init), eval_set,
                  current.ref if current else None, None, "", None, None, run, reason.strip(), record)
    ledger.append(event)
    ledger.write_pointer(record)
    registered, pushed = _after(policy, ledger, event) if policy is not None else (None, None)
    log.info("rolled %s back to %s (event #%d): %s", name, to_version, seq, reason.strip())
    return RollbackResult(record, current, event, registered, pushed)


def list_versions(models_uri: str, name: str) -> ModelVersions:
    """Every exported version of ``name``, newest first, with its latest scores and the champion marked."""
    ledger = Ledger(models_uri, name)
    state = ledger.state()
    latest: dict[str, Event] = {}
    for e in ledger.events():
        latest[e.candidate.version] = e
    rows = []
    for version in sorted({m.group(1) for o in ledger.store.list("") if (m := _EXPORT.match(o.key))}):
        try:
            ref = read_version(models_uri, name, version)
        except ValueError as err:
            log.warning("skipping %s of %s: %s", version, name, err)
            continue
        e = latest.get(version)
        scores, random_init, eval_set = (e.scores, e.random_init, e.eval_set) if e and e.scores else ({}, {}, None)
        if not scores and (exported := _export_evaluation(ref)) is not None:
            scores, random_init, eval_set = exported.scores, exported.random_init, exported.eval_set
        is_champion = state.champion is not None and state.champion.ref.version == version
        rows.append(VersionRow(ref, is_champion, dict(scores), dict(random_init), eval_set, e.action if e else "", e.seq if e else 0))
    rows.sort(key=lambda r: (r.ref.step or 0, r.ref.version), reverse=True)
    problem = version_problem(state.champion.ref, full=False) if state.champion else None
    return ModelVersions(name, models_uri, rows, state.champion, problem)
