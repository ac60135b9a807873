"""Scores -> metrics dict, the files a pipeline step hands on, and the optional Pushgateway push.

Files under ``evaluate.out``::

    kfp_metrics.json        {"knn_top1": 0.81, ...}: scalars for KFP ``Metrics.log_metric``
    confusion_matrix.json   {"categories": [...], "matrix": [[...]]}: the linear probe's, for KFP
                            ``ClassificationMetrics.log_confusion_matrix(categories, matrix)``
    confusion.png           that confusion matrix with per-class accuracy
    loss_curves.png         the training loss per part against step, when the model's history was found
    report.md               a short human-readable summary
    metrics.json            everything (written last: its presence means the rest is there)

Every kNN and probe score comes with its random-init baseline when ``evaluate.random_init`` is on
(``metrics["random_init"]``): the same architecture, seeded as training seeds it, scored the same way.
"""

from __future__ import annotations

import base64
import html
import logging
from typing import Any, Sequence

import torch
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from m3i.artifacts.evaluation import METRICS_FILE
from m3i.evaluate.curves import LOSS_CURVES, loss_curves_png, loss_series
from m3i.evaluate.knn import topk_accuracy
from m3i.evaluate.plot import confusion_png
from m3i.storage import open_store

__all__ = [
    "BASELINE",
    "EVAL_JOB",
    "METRIC_NAMES",
    "classification_metrics",
    "kfp_scalars",
    "push_metrics",
    "render_figures",
    "render_html",
    "render_report",
    "score_lines",
    "write_outputs",
]

log = logging.getLogger(__name__)

EVAL_JOB = "m3i-evaluate"
"""The ``job`` label of pushed scores."""

METRIC_NAMES = ("m3i_evaluate_accuracy_ratio", "m3i_evaluate_feature_std", "m3i_evaluate_samples")
"""Gauges pushed to the Pushgateway (see :func:`push_metrics`)."""

METHODS = ("knn", "probe", "finetune")

BASELINE = "random_init"
"""Key of the random-init baseline in ``metrics.json``, prefix of its KFP scalars and Pushgateway methods."""

BASELINE_METHODS = ("knn", "probe")

COLLAPSE_STD = 0.01
"""Below this mean per-dimension std of the eval features the report warns of collapse. The
features come after the backbone's final LayerNorm (order-1 values per dimension): trained
and random-init micro backbones measured 0.36-0.94 (tests/test_learning.py runs), a collapsed one is near 0."""
"""The methods scored at random init too (the fine-tune trains the backbone: no frozen baseline)."""

LABELS = {"knn": "kNN", "probe": "linear probe", "finetune": "fine-tune"}


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
    """Flat ``name -> value`` scalars for KFP ``Metrics.log_metric`` (accuracies as fractions).

    ``knn_top1`` ... ``finetune_mean_class_top1``, ``feature_std``, ``train_samples``, ``eval_samples``;
    with the baseline also ``random_init_knn_top1`` ... ``random_init_probe_mean_class_top1``,
    ``random_init_feature_std`` and the gains ``knn_gain_top1`` / ``probe_gain_top1`` (trained minus
    random init, as fractions).
    """
    out: dict[str, float] = {}
    keys = ("top1", "top5", "mean_class_top1")
    for method in METHODS:
        if method in metrics:
            for key in keys:
                out[f"{method}_{key}"] = float(metrics[method][key])
    out["feature_std"] = float(metrics["feature_std"]["eval"])
    out["train_samples"] = float(metrics["counts"]["train"])
    out["eval_samples"] = float(metrics["counts"]["eval"])
    base = metrics.get(BASELINE)
    if base:
        for method in BASELINE_METHODS:
            for key in keys:
                out[f"{BASELINE}_{method}_{key}"] = float(base[method][key])
            out[f"{method}_gain_top1"] = float(metrics[method]["top1"] - base[method]["top1"])
        out[f"{BASELINE}_feature_std"] = float(base["feature_std"]["eval"])
    return out


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f} %"


def _versus(metrics: dict[str, Any], method: str, key: str, digits: int) -> str:
    """``random init X % -> trained Y %``, or ``Y %`` without a baseline for ``method``."""
    base = metrics.get(BASELINE) or {}
    trained = _pct(metrics[method][key], digits)
    return f"random init {_pct(base[method][key], digits)} -> trained {trained}" if method in base else trained


def _gain(metrics: dict[str, Any], method: str, digits: int) -> str | None:
    """The top-1 gain over random init in percentage points (``+72.5``); ``None`` without a baseline."""
    base = metrics.get(BASELINE) or {}
    return f"{100 * (metrics[method]['top1'] - base[method]['top1']):+.{digits}f}" if method in base else None


def score_lines(metrics: dict[str, Any], top5: bool = True) -> list[str]:
    """One line per method for a terminal: ``kNN top-1: random init 12.5 % -> trained 85.0 % (+72.5)``.

    Args:
        metrics: What :func:`m3i.evaluate.evaluate` returns as ``metrics``.
        top5: Append the top-5 scores.
    """
    lines = []
    for method in METHODS:
        if method not in metrics:
            continue
        gain = _gain(metrics, method, 1)
        line = f"{LABELS[method]} top-1: {_versus(metrics, method, 'top1', 1)}" + (f" ({gain})" if gain else "")
        if top5:
            line += f"; top-5: {_versus(metrics, method, 'top5', 1)}"
        lines.append(line)
    return lines


def render_report(metrics: dict[str, Any]) -> str:
    """A short Markdown summary of ``metrics``: scores against the random-init baseline, figures."""
    base = metrics.get(BASELINE)
    lines = [
        f"# Evaluation of {metrics['model']['name']}",
        "",
        f"- model: `{metrics['model']['uri']}` ({metrics['model']['kind']}, step {metrics['model']['step']})",
        f"- data: `{metrics['data']['shards']}`: memory bank / probe training set `{metrics['data']['train_split']}` "
        f"({metrics['counts']['train']} labelled), scored on `{metrics['data']['eval_split']}` ({metrics['counts']['eval']})",
        f"- feature dim {metrics['feature_dim']}, feature std (eval) {metrics['feature_std']['eval']:.4f}"
        + (f" (below {COLLAPSE_STD}: the features may have collapsed)" if metrics["feature_std"]["eval"] < COLLAPSE_STD else ""),
    ]
    if base:
        lines.append(
            f"- baseline: the same architecture at random init (`torch.manual_seed({base['seed']})`, seed source: "
            f"{base['seed_source']}), same eval view, kNN and probe; its feature std {base['feature_std']['eval']:.4f}"
        )
    lines += ["", "| method | top-1 | top-1 gain (points) | top-5 | mean per-class top-1 |", "| --- | --- | --- | --- | --- |"]
    if not base:
        lines[-2:] = ["| method | top-1 | top-5 | mean per-class top-1 |", "| --- | --- | --- | --- |"]
    names = {**LABELS, "knn": f"kNN (k={metrics['knn']['k']}, T={metrics['knn']['temperature']})"}
    for method in METHODS:
        if method in metrics:
            cells = [names[method], _versus(metrics, method, "top1", 2)]
            if base:
                cells.append(_gain(metrics, method, 2) or "-")
            cells += [_versus(metrics, method, "top5", 2), _versus(metrics, method, "mean_class_top1", 2)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-class top-1 % (linear probe): " + ", ".join(
        f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in metrics["probe"]["per_class"].items()
    ), "", "![confusion matrix of the linear probe](confusion.png)", ""]
    history = metrics.get("history")
    if history and history["drawn"]:
        lines += [
            f"Training loss per part, steps {history['first_step']} to {history['last_step']} (`{history['uri']}`):",
            "",
            f"![training loss per part against step]({LOSS_CURVES})",
            "",
        ]
    return "\n".join(lines)


def render_figures(metrics: dict[str, Any], history: Sequence[dict[str, Any]] = ()) -> dict[str, bytes]:
    """The PNG figures: ``confusion.png`` always, ``loss_curves.png`` when ``history`` has a non-zero loss.

    Args:
        metrics: The scores.
        history: Rows of the model's ``history.jsonl`` (see :func:`m3i.evaluate.curves.find_history`).

    Returns:
        ``{file name: PNG bytes}``.
    """
    probe = metrics["probe"]
    title = f"linear probe, {metrics['data']['eval_split']} split: top-1 {100 * probe['top1']:.1f}%"
    figures = {"confusion.png": confusion_png(probe["confusion"], metrics["classes"], title)}
    series = loss_series(history)
    if series:
        figures[LOSS_CURVES] = loss_curves_png(series, f"training loss of {metrics['model']['name']} per part, {len(history)} steps")
    return figures


def render_html(metrics: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One self-contained HTML page (the PNGs inline as data URIs): the scores and every figure.

    For a KFP ``HTML`` artifact, which the UI shows as it is: a Markdown report cannot reach the
    PNGs in object storage.
    """
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>m3i evaluate</title></head>',
        '<body style="font-family: sans-serif">',
        f"<h2>Evaluation of {esc(str(metrics['model']['name']))}</h2>",
        f"<p>{esc(str(metrics['model']['uri']))} ({esc(str(metrics['model']['kind']))}, step {metrics['model']['step']}); "
        f"{metrics['counts']['eval']} held-out images</p>",
        "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in score_lines(metrics)) + "</ul>",
    ]
    captions = {"confusion.png": "confusion matrix of the linear probe", LOSS_CURVES: "training loss per part against step"}
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h3>{esc(captions.get(name, name))}</h3>")
        parts.append(f'<img alt="{esc(name)}" src="data:image/png;base64,{data}" style="max-width: 100%">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_outputs(out_uri: str, metrics: dict[str, Any], figures: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write the evaluation files under ``out_uri`` (``metrics.json`` last).

    Args:
        out_uri: Folder or ``s3://`` prefix.
        metrics: The scores.
        figures: ``{file name: PNG bytes}`` from :func:`render_figures`; ``None`` draws them from
            ``metrics`` alone (no loss curves).

    Returns:
        ``{file name: URI}`` of what was written.
    """
    store = open_store(out_uri)
    figures = render_figures(metrics) if figures is None else figures
    store.write_json("kfp_metrics.json", kfp_scalars(metrics))
    store.write_json("confusion_matrix.json", {"categories": list(metrics["classes"]), "matrix": metrics["probe"]["confusion"]})
    for name, png in figures.items():
        store.put_bytes(name, png, {"content-type": "image/png"})
    store.put_bytes("report.md", render_report(metrics).encode(), {"content-type": "text/markdown"})
    store.write_manifest(METRICS_FILE, metrics)
    names = ("kfp_metrics.json", "confusion_matrix.json", *figures, "report.md", METRICS_FILE)
    return {n: store.url(n) for n in names}


def push_metrics(url: str, metrics: dict[str, Any], *, timeout: float = 10.0) -> bool:
    """Push the scores to a Pushgateway; a failure is logged as a warning and returns ``False``.

    Job ``m3i-evaluate``, grouping key ``model`` (the model's name) and ``run_id``. Gauges:
    ``m3i_evaluate_accuracy_ratio{method, topk}``, ``m3i_evaluate_feature_std{split}``,
    ``m3i_evaluate_samples{split}``.

    The random-init baseline is pushed as methods of their own, named as its KFP scalars:
    ``method="random_init_knn"`` and ``method="random_init_probe"`` next to ``knn`` and ``probe``.
    A query on ``method="knn"`` keeps meaning the trained model's score (no extra label to
    aggregate away), and the gain is ``m3i_evaluate_accuracy_ratio{method="knn"} - ignoring(method)
    m3i_evaluate_accuracy_ratio{method="random_init_knn"}``. The baseline's feature std is not pushed
    (it is in ``metrics.json`` and the KFP scalars).
    """
    try:
        registry = CollectorRegistry()
        acc = Gauge(METRIC_NAMES[0], "Top-k accuracy on the held-out split, as a fraction.", ["method", "topk"], registry=registry)
        std = Gauge(METRIC_NAMES[1], "Mean per-dimension std of the frozen features (near 0 means collapse).", ["split"], registry=registry)
        count = Gauge(METRIC_NAMES[2], "Labelled samples in each split.", ["split"], registry=registry)
        scores = {m: metrics[m] for m in METHODS if m in metrics}
        scores.update({f"{BASELINE}_{m}": metrics[BASELINE][m] for m in BASELINE_METHODS if m in metrics.get(BASELINE, {})})
        for method, score in scores.items():
            acc.labels(method, "1").set(score["top1"])
            acc.labels(method, "5").set(score["top5"])
        for split in ("train", "eval"):
            std.labels(split).set(metrics["feature_std"][split])
            count.labels(split).set(metrics["counts"][split])
        grouping = {"model": metrics["model"]["name"] or "unknown", "run_id": metrics["model"].get("run_id") or "unknown"}
        push_to_gateway(url, job=EVAL_JOB, registry=registry, grouping_key=grouping, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a failed push must not fail the evaluation
        log.warning("pushing the evaluation scores to %s failed: %s", url, e)
        return False
    return True
