"""The training history of the scored model, as loss curves.

    rows = find_history(encoder)              # [] when the model has none (a bare export, a moved checkpoint)
    series = loss_series(rows)                # {"loss": ([1, 2, ...], [2.3, 2.1, ...]), "loss_img": ..., ...}
    png = loss_curves_png(series)             # one panel per loss part against step

The history is ``history.jsonl`` (:mod:`m3i.artifacts.run`) in the run output of a checkpoint
or in an export's folder. A missing or unreadable history is no error: evaluation scores the
weights, the curves are a bonus.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from m3i.artifacts.run import HISTORY_FILE, read_history
from m3i.evaluate.plot import line_chart_png
from m3i.models.pretrained import Encoder
from m3i.storage import StorageError

__all__ = ["LOSS_KEYS", "LOSS_CURVES", "find_history", "history_summary", "loss_curves_png", "loss_series"]

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "loss_img", "loss_cls", "loss_txt")
"""The loss parts drawn, in this order: the total and one per branch (see :func:`m3i.losses.combine`)."""

LOSS_CURVES = "loss_curves.png"
"""File name of the figure under ``evaluate.out``."""


def find_history(encoder: Encoder) -> list[dict[str, Any]]:
    """Rows of the encoder's training history by step, up to its step; ``[]`` when it has none or it cannot be read.

    A run's history goes on past an earlier checkpoint: rows after the scored weights' step are
    not theirs and are dropped.
    """
    if not encoder.history_uri:
        return []
    try:
        rows = read_history(encoder.history_uri)
    except (StorageError, OSError) as e:
        log.warning("reading %s/%s failed (%s); no loss curves", encoder.history_uri, HISTORY_FILE, e)
        return []
    return rows if encoder.step is None else [r for r in rows if r["step"] <= encoder.step]


def loss_series(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{part: (steps, values)}`` of every loss part that is non-zero somewhere in the history.

    A branch that is off logs 0 at every step and is left out; rows without a finite value of a
    part (``None`` for a non-finite loss) are skipped for that part.
    """
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key in LOSS_KEYS:
        points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        if any(v != 0 for _, v in points):
            out[key] = ([s for s, _ in points], [v for _, v in points])
    return out


def history_summary(uri: str, rows: Sequence[dict[str, Any]], series: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics.json`` records of the history: where, how many steps, which parts were drawn, the last values."""
    return {
        "uri": f"{uri.rstrip('/')}/{HISTORY_FILE}",
        "steps": len(rows),
        "first_step": rows[0]["step"] if rows else None,
        "last_step": rows[-1]["step"] if rows else None,
        "drawn": list(series),
        "last": {k: ys[-1] for k, (_, ys) in series.items()},
    }


def loss_curves_png(series: dict[str, tuple[list[int], list[float]]], title: str = "") -> bytes:
    """The loss parts against step, one panel each, raw and smoothed (see :func:`m3i.evaluate.plot.line_chart_png`).

    Raises:
        ValueError: When ``series`` is empty.
    """
    return line_chart_png(series, title=title or "training loss per part", xlabel="optimizer step")
