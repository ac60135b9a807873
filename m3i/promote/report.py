"""Markdown for people: the gate's report (candidate vs champion, every score with its delta) and a
model's versions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from m3i.config.promote import SCORES, PromoteConfig
from m3i.promote.gate import Decision

if TYPE_CHECKING:
    from m3i.promote.records import ChampionRecord, VersionRef, VersionRow
    from m3i.artifacts.evaluation import Evaluation

__all__ = ["render_decision", "render_versions"]

_ACCURACY = ("top1", "top5", "mean_class_top1")


def _value(score: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f} %" if score.split(".")[-1] in _ACCURACY else f"{v:.4f}"


def _delta(score: str, a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{100 * (a - b):+.2f}" if score.split(".")[-1] in _ACCURACY else f"{a - b:+.4f}"


def _ordered(*blocks: Mapping[str, float]) -> list[str]:
    names = set().union(*blocks)
    return [s for s in SCORES if s in names] + sorted(names - set(SCORES))


def _policy_line(p: PromoteConfig) -> str:
    parts = [f"`{p.primary}` must beat the champion's by more than {100 * p.min_delta:.2f} points"]
    if p.guards:
        parts.append(f"{', '.join(f'`{g}`' for g in p.guards)} may fall at most {100 * p.max_drop:.2f} points")
    if p.random_init_floor:
        parts.append(f"`{p.primary}` must beat random init by more than {100 * p.random_init_margin:.2f} points")
    parts += [f"`{f}`" for f in p.floors]
    return "; ".join(parts)


def render_decision(
    decision: Decision,
    candidate: "VersionRef",
    evaluation: "Evaluation",
    champion: "ChampionRecord | None",
    champion_scores: Mapping[str, float] | None,
    policy: PromoteConfig,
    *,
    reevaluated: str = "",
) -> str:
    """The gate's report: the decision and its reasons, every check, every score of both with its delta."""
    verdict = "PROMOTE" if decision.promote else "REJECT"
    es = evaluation.eval_set
    lines = [
        f"# Promotion gate of {candidate.name}: {verdict} {candidate.version}",
        "",
        f"- candidate: `{candidate.uri}` (step {candidate.step}, run `{candidate.run_id or '-'}`, code `{candidate.code_revision or '-'}`)",
    ]
    if champion is None:
        lines.append("- champion: none yet; only the floors apply")
    else:
        lines.append(
            f"- champion: `{champion.ref.uri}` ({champion.action} #{champion.seq} at {champion.at}, step {champion.ref.step})"
            + (f"; re-evaluated on the candidate's eval set: `{reevaluated}`" if reevaluated else "; scored on the same eval set")
        )
    lines += [
        f"- eval set: `{es.shards}`, splits `{es.train_split}` -> `{es.eval_split}`, content sha256 `{es.content_sha256[:16]}`, "
        f"fingerprint `{es.fingerprint[:16]}`",
        f"- policy: {_policy_line(policy)}",
        "",
        "## Decision",
        "",
        *(f"- {r}" for r in decision.reasons),
        "",
        "## Checks",
        "",
        "| check | score | candidate | against | delta | margin | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in decision.checks:
        lines.append(
            f"| {c.kind} | `{c.score}` | {_value(c.score, c.candidate)} | {_value(c.score, c.reference)} | "
            f"{_delta(c.score, c.candidate, c.reference)} | {_delta(c.score, c.threshold, 0.0)} | {'pass' if c.passed else 'FAIL'} |"
        )
    theirs = dict(champion_scores or {})
    lines += [
        "",
        "## Scores (deltas in points for accuracies)",
        "",
        "| score | candidate | champion | delta | candidate at random init |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in _ordered(evaluation.scores, theirs):
        mine, other = evaluation.scores.get(s), theirs.get(s)
        lines.append(f"| `{s}` | {_value(s, mine)} | {_value(s, other)} | {_delta(s, mine, other)} | {_value(s, evaluation.random_init.get(s))} |")
    return "\n".join(lines) + "\n"


def render_versions(name: str, rows: Sequence["VersionRow"], primary: str = "probe.top1") -> str:
    """A model's versions, newest first: step, ``primary``, the last gate outcome, the champion marked."""
    lines = [
        f"# Versions of {name}",
        "",
        f"| | version | step | created | `{primary}` | last event | eval set |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mark = "champion" if r.champion else ""
        last = f"{r.last_action} #{r.last_seq}" if r.last_action else "never gated"
        fp = r.eval_set.fingerprint[:12] if r.eval_set else "-"
        lines.append(f"| {mark} | `{r.ref.version}` | {r.ref.step} | {r.ref.created} | {_value(primary, r.scores.get(primary))} | {last} | {fp} |")
    return "\n".join(lines) + "\n"
