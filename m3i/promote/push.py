"""A model's promotion metrics, read from its log and pushed to a Pushgateway (job ``m3i-promote``).

The log is the durable count: each push replaces the model's group with totals read from it, so
the counters never reset with the short-lived process that pushes. Names and help texts come from
:data:`m3i.metrics.PROMOTE_SPECS`. The champion's age is ``time() -
m3i_promote_champion_timestamp_seconds``: a pushed age would be stale the moment it lands.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

from m3i.metrics import PROMOTE_SPECS
from m3i.promote.ledger import Ledger
from m3i.promote.records import ChampionRecord

__all__ = ["PROMOTE_JOB", "PromotionSummary", "push_promotion_metrics", "summarise"]

log = logging.getLogger(__name__)

PROMOTE_JOB = "m3i-promote"
"""The ``job`` label of pushed promotion metrics; the grouping key adds ``model``."""

ACTIONS = ("promote", "reject", "rollback")


@dataclass(frozen=True)
class PromotionSummary:
    """What the metrics say, read from the log."""

    counts: dict[str, int] = field(default_factory=dict)
    """Events per action."""
    consecutive_rejections: int = 0
    champion: ChampionRecord | None = None


def summarise(ledger: Ledger) -> PromotionSummary:
    """Counts per action, rejections since the champion was last set, and the champion (reads the whole log)."""
    tally: Tally[str] = Tally()
    streak, streak_open = 0, True
    for e in ledger.events(newest_first=True):
        tally[e.action] += 1
        if streak_open and e.action == "reject":
            streak += 1
        else:
            streak_open = False
    return PromotionSummary({a: tally.get(a, 0) for a in ACTIONS}, streak, ledger.state().champion)


def push_promotion_metrics(url: str, ledger: Ledger, *, timeout: float = 10.0) -> bool:
    """Push the model's promotion metrics; a failure is logged as a warning and returns ``False``."""
    try:
        s = summarise(ledger)
        registry = CollectorRegistry()
        # A model without a champion pushes no champion series: a 0 timestamp would read as an ancient champion.
        wanted = [n for n in PROMOTE_SPECS if s.champion is not None or not n.startswith("m3i_promote_champion_")]
        made = {
            name: (Counter if kind == "counter" else Gauge)(name, help_text, labels, registry=registry)
            for name, (kind, help_text, labels) in ((n, PROMOTE_SPECS[n]) for n in wanted)
        }
        for action, n in s.counts.items():
            made["m3i_promote_decisions_total"].labels(action).inc(n)
        made["m3i_promote_consecutive_rejections"].set(s.consecutive_rejections)
        if s.champion is not None:
            previous = s.champion.previous.version if s.champion.previous else ""
            made["m3i_promote_champion_info"].labels(s.champion.ref.version, previous).set(1)
            made["m3i_promote_champion_timestamp_seconds"].set(s.champion.unix)
        push_to_gateway(url, job=PROMOTE_JOB, registry=registry, grouping_key={"model": ledger.name}, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a failed push must not fail the promotion, which is recorded already
        log.warning("pushing the promotion metrics of %s to %s failed: %s", ledger.name, url, e)
        return False
    return True
