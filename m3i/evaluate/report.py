"""Scores -> metrics dict, the files a pipeline step hands on, and the optional Pushgateway push.

Files under ``evaluate.out``::

    kfp_metrics.json        {"knn_top1": 0.81, ...}: scalars for KFP ``Metrics.log_metric``
    confusion_matrix.json   {"categories": [...], "matrix": [[...]]}: the linear probe's, for KFP
                            ``ClassificationMetrics.log_confusion_matrix(categories, matrix)``
    confusion.png           that confusion matrix with per-class accuracy
    report.md               a short human-readable summary
    metrics.json            everything (written last: its presence means the rest is there)
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from m3i.evaluate.knn import topk_accuracy
from m3i.evaluate.plot import confusion_png
from m3i.storage import open_store

__all__ = ["EVAL_JOB", "METRIC_NAMES", "classification_metrics", "kfp_scalars", "push_metrics", "render_report", "write_outputs"]

log = logging.getLogger(__name__)

EVAL_JOB = "m3i-evaluate"
"""The ``job`` label of pushed scores."""

METRIC_NAMES = ("m3i_evaluate_accuracy_ratio", "m3i_evaluate_feature_std", "m3i_evaluate_samples")
"""Gauges pushed to the Pushgateway (see :func:`push_metrics`)."""

METHODS = ("knn", "probe", "finetune")


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5, mean per-class accuracy, per-class accuracy and the confusion matrix of ``scores``.

    Args:
        scores: ``[M, C]``; the predicted class is the arg-max.
        labels: ``[M]`` true classes.
        classes: ``C`` class names.

    Returns:
        ``{"top1", "top5", "mean_class_top1", "per_class": {name: accuracy or None}, "confusion": [[int]] (rows
        true, columns predicted), "count"}``; accuracies are fractions in [0, 1].
    """
    c = len(classes)
    acc = topk_accuracy(scores, labels, (1, 5))
    pred = scores.argmax(1)
    confusion = torch.bincount(labels * c + pred, minlength=c * c).view(c, c)  # [C, C]
    totals = confusion.sum(1)
    per_class = {name: (float(confusion[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    return {
        "top1": acc[1],
        "top5": acc[5],
        "mean_class_top1": sum(present) / len(present),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "count": int(len(labels)),
    }


def kfp_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat ``name -> value`` scalars for KFP ``Metrics.log_metric`` (accuracies as fractions)."""
    out: dict[str, float] = {}
    for method in METHODS:
        if method in metrics:
            for key in ("top1", "top5", "mean_class_top1"):
                out[f"{method}_{key}"] = float(metrics[method][key])
    out["feature_std"] = float(metrics["feature_std"]["eval"])
    out["train_samples"] = float(metrics["counts"]["train"])
    out["eval_samples"] = float(metrics["counts"]["eval"])
    return out


def render_report(metrics: dict[str, Any]) -> str:
    """A short Markdown summary of ``metrics``."""
    lines = [
        f"# Evaluation of {metrics['model']['name']}",
        "",
        f"- model: `{metrics['model']['uri']}` ({metrics['model']['kind']}, step {metrics['model']['step']})",
        f"- data: `{metrics['data']['shards']}`: memory bank / probe training set `{metrics['data']['train_split']}` "
        f"({metrics['counts']['train']} labelled), scored on `{metrics['data']['eval_split']}` ({metrics['counts']['eval']})",
        f"- feature dim {metrics['feature_dim']}, feature std (eval) {metrics['feature_std']['eval']:.4f} (near 0: collapse)",
        "",
        "| method | top-1 % | top-5 % | mean per-class top-1 % |",
        "| --- | --- | --- | --- |",
    ]
    names = {"knn": f"kNN (k={metrics['knn']['k']}, T={metrics['knn']['temperature']})", "probe": "linear probe", "finetune": "fine-tune"}
    for method in METHODS:
        if method in metrics:
            m = metrics[method]
            lines.append(f"| {names[method]} | {100 * m['top1']:.2f} | {100 * m['top5']:.2f} | {100 * m['mean_class_top1']:.2f} |")
    lines += ["", "Per-class top-1 % (linear probe): " + ", ".join(
        f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in metrics["probe"]["per_class"].items()
    ), "", "![confusion matrix of the linear probe](confusion.png)", ""]
    return "\n".join(lines)


def write_outputs(out_uri: str, metrics: dict[str, Any]) -> dict[str, str]:
    """Write the evaluation files under ``out_uri`` (``metrics.json`` last).

    Returns:
        ``{file name: URI}`` of what was written.
    """
    store = open_store(out_uri)
    classes = metrics["classes"]
    probe = metrics["probe"]
    title = f"linear probe, {metrics['data']['eval_split']} split: top-1 {100 * probe['top1']:.1f}%"
    store.write_json("kfp_metrics.json", kfp_scalars(metrics))
    store.write_json("confusion_matrix.json", {"categories": list(classes), "matrix": probe["confusion"]})
    store.put_bytes("confusion.png", confusion_png(probe["confusion"], classes, title), {"content-type": "image/png"})
    store.put_bytes("report.md", render_report(metrics).encode(), {"content-type": "text/markdown"})
    store.write_manifest("metrics.json", metrics)
    names = ("kfp_metrics.json", "confusion_matrix.json", "confusion.png", "report.md", "metrics.json")
    return {n: store.url(n) for n in names}


def push_metrics(url: str, metrics: dict[str, Any], *, timeout: float = 10.0) -> bool:
    """Push the scores to a Pushgateway; a failure is logged as a warning and returns ``False``.

    Job ``m3i-evaluate``, grouping key ``model`` (the model's name) and ``run_id``. Gauges:
    ``m3i_evaluate_accuracy_ratio{method, topk}``, ``m3i_evaluate_feature_std{split}``,
    ``m3i_evaluate_samples{split}``.
    """
    try:
        registry = CollectorRegistry()
        acc = Gauge(METRIC_NAMES[0], "Top-k accuracy on the held-out split, as a fraction.", ["method", "topk"], registry=registry)
        std = Gauge(METRIC_NAMES[1], "Mean per-dimension std of the frozen features (near 0 means collapse).", ["split"], registry=registry)
        count = Gauge(METRIC_NAMES[2], "Labelled samples in each split.", ["split"], registry=registry)
        for method in METHODS:
            if method in metrics:
                acc.labels(method, "1").set(metrics[method]["top1"])
                acc.labels(method, "5").set(metrics[method]["top5"])
        for split in ("train", "eval"):
            std.labels(split).set(metrics["feature_std"][split])
            count.labels(split).set(metrics["counts"][split])
        grouping = {"model": metrics["model"]["name"] or "unknown", "run_id": metrics["model"].get("run_id") or "unknown"}
        push_to_gateway(url, job=EVAL_JOB, registry=registry, grouping_key=grouping, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a failed push must not fail the evaluation
        log.warning("pushing the evaluation scores to %s failed: %s", url, e)
        return False
    return True
