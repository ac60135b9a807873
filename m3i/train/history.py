"""The per-step training history: ``<train.output>/history.jsonl``, one JSON object per optimizer step.

    history = History(cfg.train.output, resumed_from=step)   # rank 0 only
    history.append({"step": 1, "lr": 1e-4, "loss": 2.3, "loss_img": 0.8, ...})
    history.flush_if_due()                                   # after each step: at most once a minute
    history.flush()                                          # before each checkpoint and at the end
    rows = m3i.artifacts.read_history("runs/demo")           # [{"step": 1, ...}, ...] by step

Object stores have no append, so the writer keeps the rows in memory and replaces the whole
object on :meth:`History.flush` (one atomic put). A resumed run starts from the rows of the
earlier attempt up to the step it resumed from, so steps that were trained but never reached a
checkpoint are not kept twice. The file's name and its readers are in :mod:`m3i.artifacts.run`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from m3i.artifacts.run import HISTORY_FILE, read_history
from m3i.storage import StorageError, open_store

__all__ = ["FLUSH_SECONDS", "History", "render_history"]

log = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0
"""Longest time rows stay only in memory between checkpoints: a crash loses at most this much curve."""


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def render_history(rows: list[dict[str, Any]]) -> str:
    """The text of a history file: one compact JSON object per line (what :func:`m3i.artifacts.parse_history` reads)."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)


class History:
    """Rank 0's record of every optimizer step, written to ``<output>/history.jsonl``.

    Args:
        output_uri: The run's ``train.output``.
        resumed_from: The step the run resumed from; rows of an earlier attempt after it are
            dropped. ``None`` starts a fresh history (an earlier file is replaced at the first flush).
        flush_seconds: :meth:`flush_if_due` writes when this many seconds passed since the last flush.
    """

    def __init__(self, output_uri: str, resumed_from: int | None = None, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.store = open_store(output_uri)
        self.rows: list[dict[str, Any]] = []
        if resumed_from is not None:
            self.rows = [r for r in read_history(output_uri) if r["step"] <= resumed_from]
        self.flush_seconds = flush_seconds
        self.pending = 0  # rows appended since the last flush
        self._flushed = time.monotonic()

    def append(self, row: dict[str, Any]) -> None:
        """Record one step; ``row`` must hold an integer ``step``."""
        if not isinstance(row.get("step"), int):
            raise ValueError(f"a history row needs an integer 'step'; got {row.get('step')!r}")
        self.rows.append({k: _clean(v) for k, v in row.items()})
        self.pending += 1

    def seconds_since_flush(self) -> float:
        return time.monotonic() - self._flushed

    def flush(self) -> None:
        """Replace ``history.jsonl`` with every row so far (one atomic put).

        Raises:
            m3i.storage.StorageError: When storage fails after retries; the rows stay for the next flush.
        """
        text = render_history(self.rows)
        self.store.put_bytes(HISTORY_FILE, text.encode(), {"content-type": "application/x-ndjson"})
        self._flushed = time.monotonic()
        self.pending = 0

    def flush_if_due(self) -> bool:
        """Flush when rows are pending and ``flush_seconds`` passed since the last flush; whether it wrote.

        A failed write is logged, not raised: the rows stay in memory and the next flush (at the
        latest the one before the next checkpoint) writes them; training goes on.
        """
        if not self.pending or self.seconds_since_flush() <= self.flush_seconds:
            return False
        try:
            self.flush()
        except (StorageError, OSError) as e:
            log.warning("history: writing %s failed (%s); retrying at the next flush", self.store.url(HISTORY_FILE), e)
            self._flushed = time.monotonic()  # do not retry on every step of a storage outage
            return False
        return True
