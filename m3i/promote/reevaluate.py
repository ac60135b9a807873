"""The champion scored again, on the candidate's eval set, so that the gate compares like with like.

    ev = reevaluate(cfg, champion, candidate_eval.eval_set, out_uri)   # m3i evaluate of the champion's export

Runs :func:`m3i.evaluate.evaluate` on the champion's export with the candidate's data set, splits
and kNN / probe (/ fine-tune) settings; without the random-init baseline (only the candidate's
is gated) and without a push (these are not a new model's scores). A finished re-evaluation at
``out_uri`` on the same eval set is reused.
"""

from __future__ import annotations

import dataclasses
import logging

from m3i.artifacts.evaluation import METRICS_FILE, EvalSet, Evaluation, evaluation_from_metrics
from m3i.config import Config
from m3i.promote.records import ChampionRecord
from m3i.storage import StorageError, join_uri, open_store

__all__ = ["reevaluate"]

log = logging.getLogger(__name__)


def _settings(cfg: Config, eval_set: EvalSet, model: str, out: str) -> Config:
    p = eval_set.protocol
    e = cfg.evaluate
    evaluate = dataclasses.replace(
        e, model=model, out=out, train_split=eval_set.train_split, eval_split=eval_set.eval_split,
        k=int(p.get("knn.k", e.k)), knn_temperature=float(p.get("knn.temperature", e.knn_temperature)),
        probe_epochs=int(p.get("probe.epochs", e.probe_epochs)), probe_lr=float(p.get("probe.lr", e.probe_lr)),
        probe_weight_decay=float(p.get("probe.weight_decay", e.probe_weight_decay)),
        finetune_steps=int(p.get("finetune.steps", 0)), finetune_lr=float(p.get("finetune.lr", e.finetune_lr)),
        batch_size=int(p.get("finetune.batch_size", e.batch_size)), random_init=False, pushgateway="",
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=eval_set.shards), evaluate=evaluate)


def _reuse(out: str, eval_set: EvalSet, model: str) -> Evaluation | None:
    store = open_store(out)
    try:
        if not store.exists(METRICS_FILE):
            return None
        metrics = store.read_json(METRICS_FILE)
        ev = evaluation_from_metrics(metrics, source=store.url(METRICS_FILE))
    except (StorageError, ValueError) as e:
        log.warning("ignoring the earlier re-evaluation at %s: %s", out, e)
        return None
    same_model = str((metrics.get("model") or {}).get("uri", "")).rstrip("/") == open_store(model).uri.rstrip("/")
    return ev if same_model and ev.eval_set.fingerprint == eval_set.fingerprint else None


def reevaluate(cfg: Config, champion: ChampionRecord, eval_set: EvalSet, out_uri: str) -> Evaluation:
    """The champion's scores on ``eval_set``.

    Args:
        cfg: The config whose ``evaluate`` section sets what the eval set does not pin (batch size,
            workers, device, probe seed and batch size).
        champion: The champion whose export is scored.
        eval_set: The candidate's eval set.
        out_uri: Where ``m3i evaluate`` writes (a finished one there is reused).

    Returns:
        The champion's :class:`Evaluation` on ``eval_set``.

    Raises:
        RuntimeError: When the fresh scores are not on ``eval_set`` (its data set changed meanwhile).
        ValueError, m3i.storage.StorageError: As :func:`m3i.evaluate.evaluate` raises them.
    """
    from m3i.evaluate import evaluate

    model = champion.ref.uri
    earlier = _reuse(out_uri, eval_set, model)
    if earlier is not None:
        log.info("champion %s: reusing its scores on eval set %s from %s", champion.ref.version, eval_set.fingerprint[:12], out_uri)
        return earlier
    log.info("champion %s: re-evaluating on the candidate's eval set %s (%s) -> %s", champion.ref.version,
             eval_set.fingerprint[:12], eval_set.shards, out_uri)
    result = evaluate(_settings(cfg, eval_set, model, out_uri))
    ev = evaluation_from_metrics(result.metrics, source=join_uri(out_uri, METRICS_FILE))
    if ev.eval_set.fingerprint != eval_set.fingerprint:
        raise RuntimeError(
            f"the champion's re-evaluation at {out_uri} is on eval set {ev.eval_set.fingerprint[:12]}, not the candidate's "
            f"{eval_set.fingerprint[:12]}: did {eval_set.shards} change meanwhile?"
        )
    return ev
