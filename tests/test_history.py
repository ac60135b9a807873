"""The per-step history (``history.jsonl``): writer, resume, flush policy, reader; on disk and on S3."""

from __future__ import annotations

import json
import math

import pytest

from m3i.artifacts import HISTORY_FILE, parse_history, read_history
from m3i.storage import StorageError, open_store
from m3i.train.history import History, render_history


def _rows(steps, **extra):
    return [{"step": s, "loss": 1.0 / s, **extra} for s in steps]


def test_rows_are_written_only_on_flush_and_read_back_by_step(store_uri):
    h = History(store_uri)
    for row in _rows([1, 2, 3]):
        h.append(row)
    assert h.pending == 3 and read_history(store_uri) == []  # object stores have no append: nothing yet
    h.flush()
    assert h.pending == 0
    assert read_history(store_uri) == _rows([1, 2, 3])
    text = open_store(store_uri).get_bytes(HISTORY_FILE).decode()
    assert text.count("\n") == 3 and all(json.loads(line)["step"] for line in text.splitlines())


def test_a_resumed_history_keeps_each_step_up_to_the_resume_point_once(tmp_path):
    out = str(tmp_path / "run")
    first = History(out)
    for row in _rows(range(1, 6), attempt=1):
        first.append(row)
    first.flush()  # steps 1..5 written, but the run crashed with its last checkpoint at 3
    resumed = History(out, resumed_from=3)
    assert [r["step"] for r in resumed.rows] == [1, 2, 3] and resumed.pending == 0
    for row in _rows(range(4, 7), attempt=2):
        resumed.append(row)
    resumed.flush()
    rows = read_history(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["attempt"] for r in rows] == [1, 1, 1, 2, 2, 2]
    fresh = History(out)  # resumed_from=None: a new run replaces the file at its first flush
    fresh.append({"step": 1, "loss": 9.0})
    fresh.flush()
    assert read_history(out) == [{"step": 1, "loss": 9.0}]


def test_non_finite_values_become_null_and_a_row_needs_an_integer_step(tmp_path):
    h = History(str(tmp_path))
    h.append({"step": 1, "loss": float("nan"), "lr": float("inf"), "acc_cls": 0.5})
    h.flush()
    assert read_history(str(tmp_path)) == [{"step": 1, "loss": None, "lr": None, "acc_cls": 0.5}]
    for bad in ({"loss": 1.0}, {"step": 1.0}, {"step": "1"}):
        with pytest.raises(ValueError, match="integer 'step'"):
            h.append(bad)


def test_the_reader_keeps_the_last_row_of_a_step_and_skips_torn_lines():
    text = render_history(_rows([2, 1])) + '{"step": 2, "loss": 7}\n{"step": 3, "lo'
    assert parse_history(text) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 7}]
    assert parse_history("") == [] and parse_history('[1]\n{"no_step": 1}\n') == []


def test_flush_if_due_writes_only_pending_rows_after_the_interval(tmp_path, monkeypatch):
    import m3i.train.history as history

    now = [1000.0]
    monkeypatch.setattr(history.time, "monotonic", lambda: now[0])
    h = History(str(tmp_path), flush_seconds=60)
    h.append({"step": 1})
    now[0] += 60
    assert not h.flush_if_due() and read_history(str(tmp_path)) == []  # not more than 60 s yet
    now[0] += 1
    assert h.flush_if_due() and [r["step"] for r in read_history(str(tmp_path))] == [1]
    now[0] += 600
    assert not h.flush_if_due()  # nothing pending: no write


def test_a_failed_timed_flush_is_logged_and_retried_later(tmp_path, monkeypatch, caplog):
    import m3i.train.history as history

    now = [0.0]
    monkeypatch.setattr(history.time, "monotonic", lambda: now[0])
    h = History(str(tmp_path), flush_seconds=1)
    put = h.store.put_bytes

    def broken(*a, **kw):
        raise StorageError("bucket unreachable")

    monkeypatch.setattr(h.store, "put_bytes", broken)
    h.append({"step": 1})
    now[0] = 5
    assert not h.flush_if_due() and "bucket unreachable" in caplog.text and h.pending == 1
    now[0] = 5.5
    monkeypatch.setattr(h.store, "put_bytes", put)
    assert not h.flush_if_due()  # the failure counts as a try: no retry on every step of an outage
    monkeypatch.setattr(h.store, "put_bytes", broken)
    with pytest.raises(StorageError):
        h.flush()  # an explicit flush (before a checkpoint) raises: the loop decides
    monkeypatch.setattr(h.store, "put_bytes", put)
    now[0] = 10
    assert h.flush_if_due() and h.pending == 0 and read_history(str(tmp_path)) == [{"step": 1}]


def test_render_history_round_trips(tmp_path):
    rows = [{"step": s, "time": 1.7e9 + s, "lr": 1e-4 * s, "loss": math.pi} for s in range(1, 4)]
    assert parse_history(render_history(rows)) == rows
