"""The training loop's parts on their own, without a run: the metrics processor, the outputs, the save policy."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from m3i.config import CheckpointConfig
from m3i.metrics import MetricsProcessor, StepReport
from m3i.storage import StorageError


def _report(step: int, **kw) -> StepReport:
    base = dict(step=step, steps=10, parts={"loss": 1.0, "loss_img": 0.5, "n_img": 4.0}, lr=1e-3, samples=8, seconds=0.5,
                data_wait_seconds=0.1, time=1_000.0 + step)
    return StepReport(**(base | kw))


def _gauges(update) -> dict:
    return {(name, tuple(sorted(labels.items()))): value for name, value, labels in update.set}


def test_the_processor_computes_rates_over_the_recording_window_without_prometheus():
    p = MetricsProcessor(interval_steps=2, peak_flops=1e12)
    first = p.step(_report(1, flops=1e11, branch_samples={"img": 8, "txt": 0}))
    assert ("m3i_train_samples_per_second", ()) not in _gauges(first)  # not a recorded step: no gauge converted
    assert ("m3i_train_branch_samples_total", 8, {"branch": "img"}) in first.inc and not any(n == 0 for _, n, _ in first.inc)
    second = _gauges(p.step(_report(2, seconds=1.5, flops=3e11)))
    assert second[("m3i_train_samples_per_second", ())] == 16 / 2.0  # both steps' samples over both steps' seconds
    assert second[("m3i_train_model_flops_per_second", ())] == 4e11 / 2.0
    assert second[("m3i_train_mfu_ratio", ())] == 0.2
    assert second[("m3i_train_loss", (("part", "loss_img"),))] == 0.5 and ("m3i_train_loss", (("part", "n_img"),)) not in second
    assert second[("m3i_train_last_step_timestamp_seconds", ())] == 1_002.0  # the report's time, as the history's row
    third = _gauges(p.step(_report(4, seconds=2.0)))  # a new window
    assert third[("m3i_train_samples_per_second", ())] == 4.0 and ("m3i_train_model_flops_per_second", ()) not in third


def test_history_rows_come_from_the_report():
    from m3i.train.outputs import HistoryOutput

    rows = []
    history = SimpleNamespace(append=rows.append, flush_if_due=lambda: False, pending=0)
    HistoryOutput(history).on_step(_report(3))
    assert list(rows[0]) == ["step", "time", "lr", "loss", "loss_img", "n_img", "step_seconds", "data_wait_seconds"]
    assert rows[0]["time"] == 1_003.0 and rows[0]["step_seconds"] == 0.5


def test_outputs_close_every_output_even_when_one_fails(caplog):
    from m3i.train.outputs import Outputs, StepOutput

    closed = []

    class Broken(StepOutput):
        def close(self) -> None:
            raise OSError("socket already gone")

    class Fine(StepOutput):
        def close(self) -> None:
            closed.append(self)

    outputs = Outputs([Fine(), Broken(), Fine()])
    with caplog.at_level(logging.ERROR, logger="m3i"):
        outputs.close()
    assert len(closed) == 2
    assert "closing the training output Broken failed" in caplog.text


class _Checkpointer:
    """The mechanics, faked: saves fail while ``down`` and count what was asked."""

    def __init__(self) -> None:
        self.last_saved_step, self.down, self.saved = None, False, []
        self.info = SimpleNamespace(is_main=True)

    def save(self, engine, step, client_state, rank_state) -> float:
        if self.down:
            raise StorageError(f"checkpoint step-{step:08d} was not completed: upload failed")
        self.saved.append((step, client_state))
        self.last_saved_step = step
        return 0.1

    def uri_of(self, step: int) -> str:
        return f"mem://run/checkpoints/step-{step:08d}"


def _manager(monkeypatch, history_fails: bool = False, **cfg):
    from m3i.train import checkpointing

    monkeypatch.setattr(checkpointing, "all_ok", lambda ok: ok)  # one process: every rank agrees with itself
    state = SimpleNamespace(step=0, state_dict=lambda: {"step": state.step, "loader": {}}, rank_state=lambda: {})

    def flush() -> None:
        if history_fails:
            raise StorageError("put history.jsonl failed after 3 attempts")

    seen = []
    manager = checkpointing.CheckpointManager(
        _Checkpointer(), CheckpointConfig(**cfg), SimpleNamespace(is_main=True), engine=None, ema=SimpleNamespace(state_dict=dict),
        state=state, meta={"run_id": "r"}, flush_history=flush, on_save=lambda s, ok: seen.append(ok),
    )
    return manager, state, seen


def test_the_manager_saves_on_the_interval_and_at_the_end_only(monkeypatch):
    manager, state, seen = _manager(monkeypatch, interval_steps=3)
    for step in range(1, 8):
        state.step = step
        manager.save(step, last=step == 7)
    assert [s for s, _ in manager.checkpointer.saved] == [3, 6, 7] and seen == [True] * 3
    assert manager.checkpointer.saved[0][1] == {"step": 3, "loader": {}, "ema": {}, "meta": {"run_id": "r"}}
    assert manager.save_last(7) == manager.last_uri == "mem://run/checkpoints/step-00000007"  # saved already: not again
    assert len(manager.checkpointer.saved) == 3


@pytest.mark.parametrize("history_fails", [True, False])
def test_the_manager_counts_failed_saves_whatever_failed_and_stops_at_the_limit(monkeypatch, history_fails):
    manager, state, seen = _manager(monkeypatch, history_fails=history_fails, interval_steps=1, max_consecutive_failures=2)
    manager.checkpointer.down = not history_fails
    state.step = 1
    assert manager.save(1) is None and manager.failures_in_a_row == 1
    state.step = 2
    with pytest.raises(StorageError, match=r"that is 2 failed checkpoint saves in a row \(checkpoint.max_consecutive_failures=2\)"):
        manager.save(2)
    assert seen == [False, False]


def test_a_good_save_resets_the_count_and_a_failed_final_save_raises_at_once(monkeypatch):
    manager, state, _ = _manager(monkeypatch, interval_steps=1, max_consecutive_failures=2)
    manager.checkpointer.down = True
    state.step = 1
    manager.save(1)
    manager.checkpointer.down = False
    state.step = 2
    assert manager.save(2).endswith("step-00000002") and manager.failures_in_a_row == 0
    manager.checkpointer.down = True
    state.step = 3
    with pytest.raises(StorageError, match=r"^checkpoint step-00000003 was not completed: upload failed$"):
        manager.save(3, last=True)
    assert manager.failures_in_a_row == 1 and manager.last_uri.endswith("step-00000002")
