"""`m3i train` through the DeepSpeed engine in bf16/fp16 as it runs on CUDA, fp16 overflow skips, the
host syncs of a step, the SIGTERM grace period, TF32 and the communication settings.

All in one process on the CPU (gloo, one rank), with the tiny model of tests/helpers.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import pytest
import torch

from m3i.config import load_config
from tests.helpers import one_rank_here, shard_small, small_demo, write_train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("precision-data")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


def _cfg(tmp_path, shards, name="c", **sections):
    sections["data"] = {"num_workers": 0, **sections.get("data", {})}
    return load_config(None, write_train_config(tmp_path / f"{name}.yaml", shards, str(tmp_path / "run"), **sections))


def _spy_engine(monkeypatch):
    """Remember the engine and scheduler the loop builds."""
    from m3i.train import loop

    seen = {}
    real = loop.build_engine

    def build(cfg, model, world_size):
        seen["engine"], seen["optimizer"], seen["scheduler"] = real(cfg, model, world_size)
        return seen["engine"], seen["optimizer"], seen["scheduler"]

    monkeypatch.setattr(loop, "build_engine", build)
    return seen


def _wrap_forward(monkeypatch, wrapper):
    """Build models whose forward is ``wrapper(forward, batch, call_number)``."""
    from m3i.train import loop

    real_build = loop.build_model
    calls = {"n": 0}

    def build(cfg, num_classes=None):
        model = real_build(cfg, num_classes=num_classes)
        forward = model.forward

        def wrapped(batch):
            calls["n"] += 1
            return wrapper(forward, batch, calls["n"])

        model.forward = wrapped
        return model

    monkeypatch.setattr(loop, "build_model", build)
    return calls


def cuda_style_autocast_check(monkeypatch) -> None:
    """DeepSpeed's CUDA decision on the CPU: the no-argument ``torch.is_autocast_enabled()`` (CUDA's, on a GPU)
    reports on whenever CPU autocast is on (/work/shared/ENVIRONMENT.md, "GPU facts")."""
    real = torch.is_autocast_enabled

    def is_autocast_enabled(*args, **kwargs):
        if not args and not kwargs:
            return real("cpu") or real()
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "is_autocast_enabled", is_autocast_enabled)


@pytest.mark.parametrize("zero", [0, 2])
def test_bf16_training_through_the_engine_with_deepspeeds_cuda_autocast_decision(shards, tmp_path, monkeypatch, zero):
    from m3i.metrics import TrainMetrics
    from m3i.train import loop

    one_rank_here(monkeypatch)
    cuda_style_autocast_check(monkeypatch)
    seen = []

    def record(forward, batch, n):
        weight = next(p for p in forward.__self__.parameters())
        seen.append((torch.is_autocast_enabled("cpu"), weight.dtype, batch["v1"].dtype))
        return forward(batch)

    _wrap_forward(monkeypatch, record)
    flops = []
    real_on_step = TrainMetrics.on_step
    monkeypatch.setattr(TrainMetrics, "on_step", lambda self, report: (flops.append(report.flops), real_on_step(self, report))[1])
    # ZeRO-2 with the default preset's communication settings, buckets small enough to need several.
    comm = {"overlap_comm": True, "reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000} if zero else {}
    cfg = _cfg(tmp_path, shards, train={"precision": "bf16", "zero_stage": zero, "steps": 3, **comm}, checkpoint={"interval_steps": 100})
    summary = loop.train(cfg, progress=False)
    assert summary.steps == 3 and summary.skipped_steps == 0
    assert all(v == v for k, v in summary.last_parts.items())  # finite
    # The model ran in bf16 with autocast off, as DeepSpeed runs it on CUDA.
    assert seen and all(s == (False, torch.bfloat16, torch.bfloat16) for s in seen), seen
    assert len(flops) == 3 and flops[0] > 0 and len(set(flops)) == 1  # counted once, on the first micro-batch


def test_fp16_overflow_holds_step_ema_and_schedule_together(shards, tmp_path, monkeypatch):
    from m3i.models import ema_momentum
    from m3i.train import loop
    from m3i.train.ema import EMAUpdater
    from m3i.train.engine import lr_lambda, peak_lr
    from m3i.artifacts import read_history

    one_rank_here(monkeypatch)
    seen = _spy_engine(monkeypatch)

    def overflow_on_call_3(forward, batch, n):
        out = forward(batch)
        if n == 3:  # finite in float32, but its loss-scaled gradients overflow fp16
            out["loss"] = out["loss"] * 1e30
        return out

    _wrap_forward(monkeypatch, overflow_on_call_3)
    momenta = []
    real_step = EMAUpdater.step
    monkeypatch.setattr(EMAUpdater, "step", lambda self, m: (momenta.append(m), real_step(self, m))[1])
    cfg = _cfg(tmp_path, shards, train={"precision": "fp16", "steps": 5}, checkpoint={"interval_steps": 100})
    summary = loop.train(cfg, progress=False)

    engine, scheduler = seen["engine"], seen["scheduler"]
    assert summary.steps == 5 and summary.skipped_steps == 0
    assert summary.overflow_steps >= 1 and summary.overflow_steps == engine.skipped_steps
    assert engine.global_steps == summary.steps + summary.overflow_steps  # every optimizer call, applied or not
    assert scheduler.last_epoch == summary.steps  # the schedule moved once per applied step
    assert momenta == [ema_momentum(s, 5, cfg.model.ema_m0) for s in range(1, 6)]  # the EMA likewise
    peak, schedule = peak_lr(cfg, 1), lr_lambda(cfg, peak_lr(cfg, 1))
    rows = read_history(cfg.train.output)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["lr"] == pytest.approx(peak * schedule(r["step"] - 1)) for r in rows)  # the rate each step applied
    assert all(r["loss"] < 1e6 for r in rows)  # the overflowed batch's loss is no step's


class HostSyncs:
    """Counts tensor -> Python conversions (a host sync on CUDA) issued by the given source files."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch, *files: str) -> None:
        self.files = files
        self.count = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, real):
        def method(t, *a, **kw):
            if sys._getframe(1).f_code.co_filename.endswith(self.files):
                self.count += 1
            return real(t, *a, **kw)

        return method


def test_one_host_sync_per_optimizer_step_for_the_finite_check_and_the_logged_parts(shards, tmp_path, monkeypatch):
    from pathlib import Path

    from m3i.train import loop
    from m3i.train.history import History

    one_rank_here(monkeypatch)
    # Every file of the training loop and of its metrics (trainer, state, checkpointing, outputs, dist, ...).
    package = Path(loop.__file__).resolve().parents[1]
    files = [os.path.join("m3i", d, f.name) for d in ("train", "metrics") for f in sorted((package / d).glob("*.py"))]
    syncs = HostSyncs(monkeypatch, *files)
    counts = []
    real_append = History.append
    monkeypatch.setattr(History, "append", lambda self, row: (counts.append(syncs.count), real_append(self, row))[1])
    cfg = _cfg(tmp_path, shards, train={"steps": 4}, checkpoint={"interval_steps": 100})
    assert loop.train(cfg, progress=False).steps == 4
    per_step = [b - a for a, b in zip(counts, counts[1:])]
    assert per_step == [1, 1, 1], counts


def _sigterm_on_call(monkeypatch, call: int) -> None:
    def send(forward, batch, n):
        if n == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(batch)

    _wrap_forward(monkeypatch, send)


@pytest.mark.parametrize("grace, warned", [("1e-9", True), ("1e9", False)])
def test_sigterm_save_knows_the_grace_period(shards, tmp_path, monkeypatch, caplog, grace, warned):
    from m3i.train import Preempted, loop
    from m3i.artifacts import find_latest

    one_rank_here(monkeypatch)
    monkeypatch.setenv("M3I_TERMINATION_GRACE_SECONDS", grace)
    _sigterm_on_call(monkeypatch, 3)
    cfg = _cfg(tmp_path, shards, train={"steps": 50}, checkpoint={"interval_steps": 2})
    caplog.set_level(logging.INFO, logger="m3i")
    with pytest.raises(Preempted, match="SIGTERM at step 3"):
        loop.train(cfg, progress=False)
    assert find_latest(cfg.train.output).step == 3
    said = [r.getMessage() for r in caplog.records if r.name == "m3i.train.preemption"]
    assert any("SIGKILL expected at about" in m and f"M3I_TERMINATION_GRACE_SECONDS={float(grace):g}" in m for m in said), said
    # Step 2's interval save took some time; with no grace left the SIGTERM save is warned about before and after.
    before = [m for m in said if m.startswith("SIGTERM save of step 3: the last save took")]
    after = [m for m in said if "after the" in m and "grace period" in m]
    spare = [m for m in said if "of the grace period to spare" in m]
    assert (bool(before), bool(after), bool(spare)) == (warned, warned, not warned), said


def test_a_bad_grace_period_is_ignored_with_a_warning(caplog):
    from m3i.train.preemption import grace_seconds

    assert grace_seconds({"M3I_TERMINATION_GRACE_SECONDS": "120"}) == 120.0
    assert grace_seconds({}) is None
    for bad in ("soon", "-5", "0", "nan", "inf"):
        with caplog.at_level(logging.WARNING, logger="m3i"):
            assert grace_seconds({"M3I_TERMINATION_GRACE_SECONDS": bad}) is None
        assert f"M3I_TERMINATION_GRACE_SECONDS={bad!r} is not a positive number" in caplog.text


def test_tf32_is_set_on_cuda_only_and_as_configured():
    from m3i.train.engine import configure_float32_matmuls

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert configure_float32_matmuls(load_config("default"), torch.device("cpu")) is False
        assert torch.backends.cuda.matmul.allow_tf32 is False  # the CPU leaves the process alone
        assert configure_float32_matmuls(load_config("default"), torch.device("cuda", 0)) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert configure_float32_matmuls(load_config("default", overrides=["train.allow_tf32=false"]), torch.device("cuda", 0)) is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_default_preset_is_a_gpu_run_and_its_comm_settings_reach_deepspeed():
    from m3i.train.engine import deepspeed_config

    cfg = load_config("default")
    t = cfg.train
    assert (t.precision, t.zero_stage, t.allow_tf32, t.overlap_comm, t.contiguous_gradients) == ("bf16", 2, True, True, True)
    ds = deepspeed_config(cfg, 8)
    zero = ds["zero_optimization"]
    assert zero == {"stage": 2, "elastic_checkpoint": True, "overlap_comm": True, "contiguous_gradients": True,
                    "reduce_bucket_size": t.reduce_bucket_size, "allgather_bucket_size": t.allgather_bucket_size}
    assert ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"] and "torch_autocast" not in ds
    assert ds["train_batch_size"] == cfg.data.batch_size * 8
    # ZeRO 0 has no buckets to set; ZeRO-3 overlaps by itself.
    assert deepspeed_config(load_config("default", overrides=["train.zero_stage=0"]), 8)["zero_optimization"] == {"stage": 0}
    assert "overlap_comm" not in deepspeed_config(load_config("default", overrides=["train.zero_stage=3"]), 8)["zero_optimization"]
    # The demo stays a CPU run.
    assert load_config("demo").train.precision == "fp32"


@pytest.mark.parametrize("key, bad", [("reduce_bucket_size", 1000), ("allgather_bucket_size", 3_000_000_000)])
def test_bucket_sizes_are_validated(key, bad):
    with pytest.raises(ValueError, match=rf"train\.{key}={bad} is out of range; allowed \[1000000, 2000000000\]"):
        load_config(None, overrides=[f"train.{key}={bad}"])
