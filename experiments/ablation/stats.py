"""The ablation's numbers: final scores per seed, mean and sample std, M3I against each arm (Welch's t), mean curves.

    s = summarise(results, ["m3i", "cls"], ["shape"])      # {"shape": {"m3i": {"probe_top1": (mean, std), ...}}}
    for c in compare(m3i_scores, {"cls": cls_scores}):    # one Comparison a rival
        print(verdict_line("shape", "kNN", [c]))
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from experiments.ablation.arms import RANDOM

__all__ = ["SCORES", "Comparison", "compare", "final_scores", "mean_curves", "summarise", "verdict_line"]

_T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
"""Two-sided 5 % critical values of Student's t by degrees of freedom (n1 + n2 - 2); 2.0 beyond."""
SCORES = (("knn_top1", "kNN"), ("probe_top1", "linear probe"))
"""(key in a curve point, name in the report) of each score."""


def final_scores(results: list[dict[str, Any]], variant: str, attribute: str, metric: str) -> dict[int, float]:
    """``{seed: score in %}`` of ``variant``'s last curve point on ``attribute``."""
    return {r["seed"]: 100 * r["curve"][attribute][-1][metric] for r in results if r["variant"] == variant and attribute in r["curve"]}


def summarise(results: list[dict[str, Any]], variants: Sequence[str], attributes: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{attribute: {variant: {metric: (mean, sample std), "n": seeds}}}`` of the final scores in % (``feature_std`` as is)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a in attributes:
        for v in (RANDOM, *variants):
            rows = [r["curve"][a][-1] for r in results if r["variant"] == v and a in r["curve"]]
            if rows:
                entry: dict[str, Any] = {m: _mean_std([100 * p[m] for p in rows]) for m, _ in SCORES}
                entry["feature_std"] = _mean_std([p["feature_std"] for p in rows])
                entry["n"] = len(rows)
                out.setdefault(a, {})[v] = entry
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class Comparison:
    """M3I against one other arm on one attribute and score."""

    rival: str
    diff: float
    """Mean of M3I minus the rival's, in points."""
    t: float | None
    """The difference over its standard error from the seeds' sample std; ``None`` with fewer than 2 seeds on a side."""
    crit: float | None
    """Two-sided 5 % critical value of ``|t|`` for ``n1 + n2 - 2`` degrees of freedom."""

    @property
    def reached(self) -> bool:
        return self.diff >= 0

    @property
    def clear(self) -> bool:
        return self.t is not None and self.crit is not None and abs(self.t) > self.crit


def compare(m3i: Sequence[float], rivals: dict[str, Sequence[float]]) -> list[Comparison]:
    """M3I's per-seed scores against each rival's, in the order given.

    Args:
        m3i: M3I's scores, one per seed.
        rivals: ``{arm: its scores, one per seed}``.

    Returns:
        One :class:`Comparison` a rival; ``t = (m1 - m2) / sqrt(s1^2 / n1 + s2^2 / n2)``.
    """
    m1, s1 = _mean_std(list(m3i))
    out = []
    for name, values in rivals.items():
        m2, s2 = _mean_std(list(values))
        n1, n2 = len(m3i), len(values)
        t = crit = None
        if n1 > 1 and n2 > 1:
            se = math.sqrt(s1**2 / n1 + s2**2 / n2)
            t = (m1 - m2) / se if se > 0 else (0.0 if m1 == m2 else math.copysign(math.inf, m1 - m2))
            crit = _T_CRIT.get(n1 + n2 - 2, 2.0)
        out.append(Comparison(name, m1 - m2, t, crit))
    return out


def verdict_line(attribute: str, score: str, comparisons: list[Comparison]) -> str:
    """One Markdown bullet: does M3I reach every other arm on this attribute and score, and how clearly."""
    behind = [c.rival for c in comparisons if not c.reached]
    head = "reaches every other arm" if not behind else "does **not** reach " + ", ".join(f"`{b}`" for b in behind)
    parts = []
    for c in comparisons:
        if c.t is None:
            stat = "t n/a with one seed"
        else:
            stat = f"t = {c.t:.2f}, {'a clear' if c.clear else 'not a clear'} difference (|t| > {c.crit})"
        parts.append(f"`{c.rival}` {c.diff:+.1f} points ({stat})")
    return f"- **{attribute}**, {score}: M3I {head}. Against " + "; ".join(parts) + "."


def mean_curves(results: list[dict[str, Any]], variants: Sequence[str], attribute: str, metric: str = "probe_top1") -> dict[str, tuple[list[int], list[float]]]:
    """``{variant: (steps, mean score in % over seeds)}`` of each arm's curve on ``attribute``."""
    out = {}
    for v in variants:
        by_step: dict[int, list[float]] = {}
        for r in results:
            if r["variant"] == v and attribute in r["curve"]:
                for p in r["curve"][attribute]:
                    by_step.setdefault(p["step"], []).append(100 * p[metric])
        if by_step:
            xs = sorted(by_step)
            out[v] = (xs, [statistics.fmean(by_step[x]) for x in xs])
    return out
