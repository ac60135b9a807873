"""A training run's output: its summary and its per-step history.

    summary = read_summary("runs/demo")       # <train.output>/summary.json as a TrainSummary
    rows = read_history("runs/demo")          # <train.output>/history.jsonl: [{"step": 1, ...}, ...] by step

Layout under ``train.output``::

    summary.json        written by rank 0 when training ends (:class:`TrainSummary`)
    history.jsonl       one JSON object per optimizer step (written by :class:`m3i.train.history.History`)
    checkpoints/        see :mod:`m3i.artifacts.checkpoint`

Readers of the history keep the last row of each step and skip a torn line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from m3i.storage import open_store

__all__ = ["HISTORY_FILE", "SUMMARY_FILE", "TrainSummary", "parse_history", "read_history", "read_summary"]

SUMMARY_FILE = "summary.json"
"""Name of the run's summary under its output."""

HISTORY_FILE = "history.jsonl"
"""Name of the history object under the run's output (and in an export that carries it)."""


@dataclass
class TrainSummary:
    """What a finished training run did: returned by :func:`m3i.train.train`, written as ``summary.json``."""

    run_id: str
    steps: int
    """The step the run ended at."""
    resumed_from: int | None
    """The checkpoint step it resumed from; ``None`` for a fresh start."""
    samples: int
    """Samples this run trained on (every rank, since the resume)."""
    seconds: float
    """Wall time of the training loop."""
    skipped_steps: int
    """Steps skipped for a non-finite loss."""
    last_parts: dict[str, float] = field(default_factory=dict)
    """The loss parts of the last step (``loss``, ``loss_img``, ...)."""
    checkpoint: str | None = None
    """URI of the last checkpoint saved."""
    data_stats: dict[str, int] = field(default_factory=dict)
    """The loader's failure counts (``shards_failed``, ``samples_failed``, ``samples_padded``)."""
    overflow_steps: int = 0
    """Optimizer steps DeepSpeed skipped for overflowing gradients (fp16 loss scaling; bf16 on inf/NaN
    gradients): retried with the next batch, not counted in ``steps``."""
    peak_lr: float | None = None
    """The schedule's peak learning rate for the run's global batch; ``None`` where not recorded."""
    world_size: int = 1
    """Ranks that trained."""

    def to_json(self) -> dict[str, Any]:
        """The ``summary.json`` document."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = SUMMARY_FILE) -> "TrainSummary":
        """The summary of a ``summary.json`` document; keys it does not know are ignored.

        Raises:
            ValueError: When it is not an object or lacks a field without a default (naming ``where``).
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} is a JSON {type(raw).__name__}, not a training summary")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in raw]
        if missing:
            raise ValueError(f"{where} is not a training summary: it has no {missing}")
        return cls(**{k: v for k, v in raw.items() if k in names})


def read_summary(output_uri: str) -> TrainSummary:
    """The ``summary.json`` of the run at ``output_uri``.

    Raises:
        m3i.storage.StorageError: When it is missing (the run did not finish) or storage fails after retries.
        ValueError: When it is not a training summary.
    """
    store = open_store(output_uri)
    return TrainSummary.from_json(store.read_json(SUMMARY_FILE), store.url(SUMMARY_FILE))


def parse_history(text: str) -> list[dict[str, Any]]:
    """Rows of a history file's text: the last row of each step, sorted by step; torn lines skipped."""
    rows: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write of an older, appending writer
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def read_history(uri: str) -> list[dict[str, Any]]:
    """The history under ``uri`` (a run's output or an export folder); ``[]`` when there is none.

    Raises:
        m3i.storage.StorageError: When storage fails after retries.
    """
    store = open_store(uri)
    if not store.exists(HISTORY_FILE):
        return []
    return parse_history(store.get_bytes(HISTORY_FILE).decode("utf-8", errors="replace"))

