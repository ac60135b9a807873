"""``m3i evaluate``: load the encoder, embed both splits, score kNN and a linear probe against the same
architecture at random init, draw the training loss curves, write and push."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from m3i import __version__
from m3i.artifacts.dataset import ShardIndex, content_sha256
from m3i.config import Config, EvaluateConfig
from m3i.data import resolve_device
from m3i.evaluate.curves import find_history, history_summary, loss_series
from m3i.evaluate.features import Features, eval_transform, extract_features, read_split_index
from m3i.evaluate.finetune import finetune
from m3i.evaluate.knn import knn_scores
from m3i.evaluate.baseline import random_init
from m3i.evaluate.probe import linear_probe
from m3i.evaluate.report import BASELINE, classification_metrics, push_metrics, render_figures, write_outputs
from m3i.models.pretrained import Encoder, load_encoder

__all__ = ["EvalResult", "evaluate", "feature_spread", "score_features", "score_random_init"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns."""

    metrics: dict[str, Any]
    """Everything ``metrics.json`` holds."""
    files: dict[str, str]
    """``{file name: URI}`` of the outputs."""
    pushed: bool | None = None
    """Whether the Pushgateway push succeeded; ``None`` when it is off."""
    figures: dict[str, bytes] = field(default_factory=dict)
    """``{file name: PNG bytes}`` of the figures written (``confusion.png``, ``loss_curves.png``)."""


def feature_spread(features: torch.Tensor) -> float:
    """Collapse monitor: per-dimension std of the L2-normalised features, averaged, times sqrt(D).

    Scale-free; about 1 for features spread evenly over directions, 0 when every sample maps to
    the same direction.
    """
    if len(features) < 2:
        return 0.0
    f = F.normalize(features.float(), dim=1)
    return float(f.std(dim=0).mean() * math.sqrt(f.shape[1]))


def score_features(train: Features, test: Features, classes: Sequence[str], cfg: EvaluateConfig) -> dict[str, Any]:
    """kNN and linear-probe scores of frozen features, computed on ``cfg.device``.

    Args:
        train: The memory bank and the probe's training set.
        test: The held-out features to score.
        classes: Class names (``C``); labels index into them.
        cfg: The ``evaluate`` section (``k``, ``knn_temperature``, ``probe_*``, ``seed``, ``device``).

    Returns:
        ``{"knn": {..., "k", "temperature"}, "probe": {...}, "feature_std": {"train", "eval"},
        "counts": {"train", "eval"}, "feature_dim", "seconds": {"knn", "probe"}}``, each method's entry as
        :func:`m3i.evaluate.report.classification_metrics` returns it.
    """
    c = len(classes)
    device = resolve_device(cfg.device)
    x_train, y_train, x_test = (t.to(device) for t in (train.features, train.labels, test.features))
    t0 = time.monotonic()
    votes = knn_scores(x_train, y_train, x_test, c, cfg.k, cfg.knn_temperature).cpu()
    t1 = time.monotonic()
    logits = linear_probe(
        x_train, y_train, x_test, c, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
        weight_decay=cfg.probe_weight_decay, batch_size=cfg.probe_batch_size, seed=cfg.seed,
    ).cpu()
    t2 = time.monotonic()
    return {
        "knn": {**classification_metrics(votes, test.labels, classes), "k": cfg.k, "temperature": cfg.knn_temperature},
        "probe": {
            **classification_metrics(logits, test.labels, classes),
            "epochs": cfg.probe_epochs, "lr": cfg.probe_lr, "weight_decay": cfg.probe_weight_decay,
        },
        "feature_std": {"train": feature_spread(train.features), "eval": feature_spread(test.features)},
        "counts": {"train": len(train), "eval": len(test)},
        "feature_dim": int(train.features.shape[1]),
        "seconds": {"knn": t1 - t0, "probe": t2 - t1},
    }


def score_random_init(encoder: Encoder, index: ShardIndex, transform: Any, cfg: EvaluateConfig) -> dict[str, Any]:
    """The baseline: the encoder's architecture at random init, scored as the trained encoder is.

    Seeded as training seeds it (:func:`m3i.evaluate.random_init`, on the CPU, then moved to
    ``cfg.device``), embedded with the same eval view, scored with the same kNN and probe settings
    (:func:`score_features`).

    Returns:
        ``{"seed", "seed_source", "architecture", "knn", "probe", "feature_std", "seconds"}``, ``knn``,
        ``probe`` and ``feature_std`` as :func:`score_features` returns them.
    """
    t0 = time.monotonic()
    module = random_init(encoder).to(resolve_device(cfg.device))
    kw = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
    train = extract_features(module, index, cfg.train_split, transform, **kw)
    test = extract_features(module, index, cfg.eval_split, transform, **kw)
    scores = score_features(train, test, index.classes, cfg)
    return {
        "seed": encoder.seed,
        "seed_source": encoder.seed_source,
        "architecture": encoder.info.get("architecture", ""),
        **{k: scores[k] for k in ("knn", "probe", "feature_std")},
        "seconds": time.monotonic() - t0,
    }


def _data_shards(cfg: Config, encoder: Encoder, data_from_model: bool) -> str:
    """The data set to score on; logged with where it comes from."""
    if data_from_model and encoder.data_shards:
        log.info("data: %s (the data set the model records; set data.shards to score on another)", encoder.data_shards)
        return encoder.data_shards
    if data_from_model:
        log.info("data: %s (data.shards default: the model records no data set)", cfg.data.shards)
    else:
        log.info("data: %s (data.shards as given)", cfg.data.shards)
    return cfg.data.shards


def evaluate(cfg: Config, *, data_from_model: bool = False) -> EvalResult:
    """Score ``cfg.evaluate.model`` on the labelled samples of ``cfg.data.shards``.

    With ``data_from_model`` the data set the model records (:attr:`Encoder.data_shards`: what it
    was trained on) replaces ``cfg.data.shards``; a model that records none falls back to it.
    ``m3i evaluate`` sets it when the user gave no ``data.shards``.

    The model's own image size and normalisation are used (from the checkpoint's run config or
    the export's ``config.json``), not ``data.image_size``. Feature extraction, kNN, the probe
    and the fine-tune run on ``evaluate.device`` (``auto``: the GPU when there is one). With ``evaluate.random_init`` the same
    architecture at random init is scored too (``metrics["random_init"]``, see
    :func:`score_random_init`). When the model's training history is found (``history.jsonl`` in the
    run output of a checkpoint or in the export folder) its loss curves are drawn.

    Returns:
        The :class:`EvalResult`; the files are under ``cfg.evaluate.out``.

    Raises:
        ValueError: On a missing or unusable model, a data set without labelled samples, or
            ``evaluate.device=cuda`` where CUDA is not available.
        m3i.storage.StorageError: When storage fails after retries.
        RuntimeError: When a split reads fewer labelled samples than its index lists.
    """
    e = cfg.evaluate
    t0 = time.monotonic()
    device = resolve_device(e.device)  # first: a cuda request without CUDA fails before any loading
    log.info("device: %s (evaluate.device=%s)", device, e.device)
    encoder = load_encoder(e.model)
    encoder.module.to(device)
    shards = _data_shards(cfg, encoder, data_from_model)
    index = read_split_index(shards)
    if index.num_classes < 2:
        raise ValueError(f"data.shards={shards!r} has {index.num_classes} classes; evaluation needs at least 2")
    expected_classes = encoder.info.get("num_classes")
    if expected_classes and int(expected_classes) != index.num_classes:
        log.warning("the model was trained with %s classes, %s has %d", expected_classes, index.uri, index.num_classes)
    transform = eval_transform(encoder)
    t_load = time.monotonic()
    kw = {"batch_size": e.batch_size, "num_workers": e.num_workers}
    train = extract_features(encoder.module, index, e.train_split, transform, **kw)
    test = extract_features(encoder.module, index, e.eval_split, transform, **kw)
    log.info("features: %d %s + %d %s samples in %.1fs", len(train), e.train_split, len(test), e.eval_split, train.seconds + test.seconds)
    metrics: dict[str, Any] = {
        "m3i_version": __version__,
        "model": {
            "uri": encoder.uri, "kind": encoder.kind, "name": encoder.name, "step": encoder.step,
            "run_id": encoder.info.get("run_id", ""), "architecture": encoder.info.get("architecture", ""),
            "image_size": encoder.image_size, "crop_pct": encoder.crop_pct, "mean": list(encoder.mean), "std": list(encoder.std),
        },
        "data": {
            "shards": index.uri, "train_split": e.train_split, "eval_split": e.eval_split,
            "content_sha256": content_sha256(index, [e.train_split, e.eval_split]),  # what the scores are comparable on
        },
        "classes": list(index.classes),
        "num_classes": index.num_classes,
        **score_features(train, test, index.classes, e),
    }
    metrics["seconds"].update(load=t_load - t0, features=train.seconds + test.seconds)
    if e.random_init:
        metrics[BASELINE] = score_random_init(encoder, index, transform, e)
        metrics["seconds"][BASELINE] = metrics[BASELINE]["seconds"]
        log.info(
            "random init (seed %d): kNN top-1 %.3f, probe top-1 %.3f", metrics[BASELINE]["seed"],
            metrics[BASELINE]["knn"]["top1"], metrics[BASELINE]["probe"]["top1"],
        )
    if e.finetune_steps:
        t = time.monotonic()
        tuned = finetune(encoder.module, index, e, transform, encoder.image_size)
        metrics["finetune"] = {
            **classification_metrics(tuned.features, tuned.labels, index.classes),
            "steps": e.finetune_steps, "lr": e.finetune_lr, "batch_size": e.batch_size,
        }
        metrics["seconds"]["finetune"] = time.monotonic() - t
    history = find_history(encoder)
    if history:
        metrics["history"] = history_summary(encoder.history_uri, history, loss_series(history))
    figures = render_figures(metrics, history)
    metrics["seconds"]["total"] = time.monotonic() - t0
    files = write_outputs(e.out, metrics, figures)
    pushed = push_metrics(e.pushgateway, metrics) if e.pushgateway else None
    return EvalResult(metrics, files, pushed, figures)
