"""The per-step training history: ``<train.output>/history.jsonl``, one JSON object per optimizer step.

    history = History(cfg.train.output, resumed_from=step)   # rank 0 only
    history.append({"step": 1, "lr": 1e-4, "loss": 2.3, "loss_img": 0.8, ...})
    history.flush()                                          # at checkpoints, the end, and now and then
    rows = read_history("runs/demo")                         # [{"step": 1, ...}, ...] by step

Object stores have no append, so the writer keeps the rows in memory and replaces the whole
object on :meth:`History.flush` (one atomic put). A resumed run starts from the rows of the
earlier attempt up to the step it resumed from, so steps that were trained but never reached a
checkpoint are not kept twice. Readers keep the last row of each step and skip a torn line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from m3i.storage import open_store

__all__ = ["HISTORY_FILE", "History", "read_history", "parse_history"]

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
"""Name of the history object under the run's output (and in an export that carries it)."""


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


class History:
    """Rank 0's record of every optimizer step, written to ``<output>/history.jsonl``.

    Args:
        output_uri: The run's ``train.output``.
        resumed_from: The step the run resumed from; rows of an earlier attempt after it are
            dropped. ``None`` starts a fresh history (an earlier file is replaced at the first flush).
    """

    def __init__(self, output_uri: str, resumed_from: int | None = None) -> None:
        self.store = open_store(output_uri)
        self.rows: list[dict[str, Any]] = []
        if resumed_from is not None:
            self.rows = [r for r in read_history(output_uri) if r["step"] <= resumed_from]
        self._flushed = time.monotonic()

    def append(self, row: dict[str, Any]) -> None:
        """Record one step; ``row`` must hold an integer ``step``."""
        if not isinstance(row.get("step"), int):
            raise ValueError(f"a history row needs an integer 'step'; got {row.get('step')!r}")
        self.rows.append({k: _clean(v) for k, v in row.items()})

    def seconds_since_flush(self) -> float:
        return time.monotonic() - self._flushed

    def flush(self) -> None:
        """Replace ``history.jsonl`` with every row so far (one atomic put)."""
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.rows)
        self.store.put_bytes(HISTORY_FILE, text.encode(), {"content-type": "application/x-ndjson"})
        self._flushed = time.monotonic()
