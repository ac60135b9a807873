"""``m3i promote``: one champion per model, moved only by a candidate that beats it, or by a rollback.

    from m3i.promote import promote, rollback, list_versions
    r = promote(cfg, "s3://m3i/models/m3i-demo/v00000300-1a2b3c4d", "s3://m3i/evals/run-7")
    r.promoted, r.decision.reasons, r.report        # Markdown: every score of both, with its delta
    rollback("s3://m3i/models", "m3i-demo", "v00000200-9f8e7d6c", "a bad data drop")
    print(list_versions("s3://m3i/models", "m3i-demo").markdown())

A stage above ``evaluate``: it reads exports (:mod:`m3i.promote.records`) and scores
(:mod:`m3i.artifacts.evaluation`), gates them with a pure function (:mod:`m3i.promote.gate`), keeps the
pointer and the append-only log safe against concurrent writers (:mod:`m3i.promote.ledger`), re-scores
a champion measured on another eval set (:mod:`m3i.promote.reevaluate`), and optionally mirrors into
a Kubeflow Model Registry (:mod:`m3i.promote.registry`) and a Pushgateway (:mod:`m3i.promote.push`).
"""

from m3i.artifacts.evaluation import EvalSet, Evaluation, evaluation_from_metrics, read_evaluation
from m3i.promote.errors import ChampionDamaged, PromoteError, PromotionConflict
from m3i.promote.gate import Check, Decision, Scored, gate
from m3i.promote.ledger import Ledger, LedgerState
from m3i.promote.push import PROMOTE_JOB, push_promotion_metrics, summarise
from m3i.promote.records import ChampionRecord, Event, RunInfo, VersionRef, VersionRow, read_version, version_problem
from m3i.promote.reevaluate import reevaluate
from m3i.promote.report import render_decision, render_versions
from m3i.promote.run import (
    ModelVersions,
    Plan,
    PromotionResult,
    RollbackResult,
    champion_of,
    commit,
    decide,
    list_versions,
    promote,
    rollback,
)

__all__ = [
    "PROMOTE_JOB",
    "ChampionDamaged",
    "ChampionRecord",
    "Check",
    "Decision",
    "EvalSet",
    "Evaluation",
    "Event",
    "Ledger",
    "LedgerState",
    "ModelVersions",
    "Plan",
    "PromoteError",
    "PromotionConflict",
    "PromotionResult",
    "RollbackResult",
    "RunInfo",
    "Scored",
    "VersionRef",
    "VersionRow",
    "champion_of",
    "commit",
    "decide",
    "evaluation_from_metrics",
    "gate",
    "list_versions",
    "promote",
    "push_promotion_metrics",
    "read_evaluation",
    "read_version",
    "reevaluate",
    "render_decision",
    "render_versions",
    "rollback",
    "summarise",
    "version_problem",
]
