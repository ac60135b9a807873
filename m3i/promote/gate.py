"""The gate: does a candidate replace the champion? A pure function of two sets of scores and a policy.

    decision = gate(Scored("v00000300-1a2b3c4d", cand.scores, cand.random_init, fp),
                    Scored("v00000200-9f8e7d6c", champ.scores, {}, fp), cfg.promote)
    decision.promote, decision.reasons, decision.checks

Checks, in order (a candidate is promoted when every one passes):

1. floors, always: the primary score beats the same architecture at random init by more than
   ``random_init_margin`` (when ``random_init_floor``); each ``floors`` entry holds;
2. with a champion only: the primary score exceeds the champion's by more than ``min_delta``; each
   guard score is at most ``max_drop`` below the champion's.

Both sets of scores must come from the same eval set (equal fingerprints): the gate refuses to
compare others, the caller re-evaluates the champion first (:mod:`m3i.promote.reevaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from m3i.config.promote import PromoteConfig

__all__ = ["Check", "Decision", "Scored", "gate", "required_scores"]

EPS = 1e-9
"""Differences below this are equal: accuracies are ratios of counts, and 0.50 - 0.48 is 0.020000000000000018."""


@dataclass(frozen=True)
class Scored:
    """One model's scores on one eval set."""

    version: str
    scores: Mapping[str, float]
    """``{"probe.top1": 0.77, ...}`` (see :data:`m3i.config.promote.SCORES`)."""
    random_init: Mapping[str, float] = field(default_factory=dict)
    """The same scores of its architecture at random init; empty when not measured."""
    fingerprint: str = ""
    """:attr:`m3i.artifacts.EvalSet.fingerprint` of the eval set."""


@dataclass(frozen=True)
class Check:
    """One rule of the gate, applied."""

    kind: str
    """``random_init``, ``floor``, ``primary`` or ``guard``."""
    score: str
    candidate: float
    reference: float
    """What the candidate is held against: the random-init score, the floor, or the champion's score."""
    threshold: float
    """The margin: ``random_init_margin``, 0 (a floor), ``min_delta`` or ``max_drop``."""
    passed: bool

    @property
    def delta(self) -> float:
        """Candidate minus reference."""
        return self.candidate - self.reference

    def describe(self) -> str:
        """One line: what was required and what was measured."""
        c, r, t = _fmt(self.score, self.candidate), _fmt(self.score, self.reference), _fmt(self.score, self.threshold, delta=True)
        d = _fmt(self.score, self.delta, delta=True)
        verdict = "passes" if self.passed else "fails"
        if self.kind == "random_init":
            return f"{self.score} {c} vs {r} at random init: {d}, must be more than {t}: {verdict}"
        if self.kind == "floor":
            return f"{self.score} {c} must be at least {r}: {verdict}"
        if self.kind == "primary":
            return f"{self.score} {c} vs the champion's {r}: {d}, must be more than {t}: {verdict}"
        return f"{self.score} {c} vs the champion's {r}: {d}, may fall at most {t}: {verdict}"


@dataclass(frozen=True)
class Decision:
    """What the gate decided and why."""

    promote: bool
    checks: tuple[Check, ...]
    champion: str | None
    """The champion's version the candidate was held against; ``None`` when there is none."""

    @property
    def outcome(self) -> str:
        """``promote`` or ``reject``."""
        return "promote" if self.promote else "reject"

    @property
    def reasons(self) -> list[str]:
        """The failed checks when rejected; every check when promoted; the no-champion note first."""
        lines = [] if self.champion else ["no champion yet: only the floors apply"]
        return lines + [c.describe() for c in self.checks if self.promote or not c.passed]


def _fmt(score: str, value: float, delta: bool = False) -> str:
    """Accuracies in percent (deltas in points); other scores as numbers."""
    if score.split(".")[-1] in ("top1", "top5", "mean_class_top1"):
        return f"{100 * value:+.2f} points" if delta else f"{100 * value:.2f} %"
    return f"{value:+.4f}" if delta else f"{value:.4f}"


def required_scores(policy: PromoteConfig) -> list[str]:
    """Every score the policy reads from the candidate (and from the champion, but the floors)."""
    names = [policy.primary, *policy.guards, *policy.floor_values()]
    return list(dict.fromkeys(names))


def _missing(scored: Scored, names: list[str], who: str) -> None:
    missing = [n for n in names if n not in scored.scores]
    if missing:
        raise ValueError(
            f"the {who} {scored.version} has no score {missing} (it has {sorted(scored.scores)}); the policy "
            "(promote.primary, promote.guards, promote.floors) names scores its evaluation did not measure"
        )


def gate(candidate: Scored, champion: Scored | None, policy: PromoteConfig) -> Decision:
    """Decide whether ``candidate`` replaces ``champion`` under ``policy``.

    Args:
        candidate: The new version's scores (and its random-init baseline).
        champion: The champion's scores on the candidate's eval set; ``None`` when the model has no champion.
        policy: The ``promote`` config section.

    Returns:
        The :class:`Decision`, every check with its numbers.

    Raises:
        ValueError: When a score the policy names is missing, the random-init baseline is missing while
            ``random_init_floor`` is on, or the two were scored on different eval sets.
    """
    _missing(candidate, required_scores(policy), "candidate")
    checks: list[Check] = []
    if policy.random_init_floor:
        base = candidate.random_init.get(policy.primary)
        if base is None:
            raise ValueError(
                f"the candidate {candidate.version} was scored without the random-init baseline of {policy.primary} "
                "(evaluate.random_init=false?); evaluate it with evaluate.random_init=true or set promote.random_init_floor=false"
            )
        value = candidate.scores[policy.primary]
        checks.append(Check("random_init", policy.primary, value, base, policy.random_init_margin, value - base > policy.random_init_margin + EPS))
    for name, floor in policy.floor_values().items():
        checks.append(Check("floor", name, candidate.scores[name], floor, 0.0, candidate.scores[name] >= floor - EPS))
    if champion is not None:
        if champion.fingerprint != candidate.fingerprint:
            raise ValueError(
                f"the champion {champion.version} was scored on another eval set (fingerprint {champion.fingerprint[:12]}) "
                f"than the candidate {candidate.version} ({candidate.fingerprint[:12]}); re-evaluate the champion on the "
                "candidate's eval set first"
            )
        _missing(champion, [policy.primary, *policy.guards], "champion")
        c, r = candidate.scores[policy.primary], champion.scores[policy.primary]
        checks.append(Check("primary", policy.primary, c, r, policy.min_delta, c - r > policy.min_delta + EPS))
        for name in policy.guards:
            c, r = candidate.scores[name], champion.scores[name]
            checks.append(Check("guard", name, c, r, policy.max_drop, r - c <= policy.max_drop + EPS))
    return Decision(all(c.passed for c in checks), tuple(checks), champion.version if champion else None)
