"""`m3i train` on CPU with gloo: 2 processes, checkpoints, resume, faults, ZeRO stages."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.prometheus import prometheus_factory  # noqa: F401 - a fixture
from tests.helpers import final_weights, shard_small, small_demo, one_rank_here, torchrun_cmd, train_env, write_train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-data")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


def _run(cmd, timeout=240, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=timeout, **kw)
    return r


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def _summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_kill9_of_one_rank_then_relaunch_resumes_to_identical_weights(shards, tmp_path):
    steps = {"steps": 10}
    ref_out = tmp_path / "reference"
    _ok(_run(torchrun_cmd(write_train_config(tmp_path / "ref.yaml", shards, str(ref_out), train=steps))))
    reference = final_weights(ref_out, 10)

    out = tmp_path / "killed"
    cfg = write_train_config(tmp_path / "k.yaml", shards, str(out), train=steps)
    proc = subprocess.Popen(torchrun_cmd(cfg), env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = out / "checkpoints" / "step-00000004" / "complete.json"
    deadline = time.monotonic() + 180
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint at step 4 to resume from"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / "checkpoints" / "step-00000010" / "complete.json").exists(), "the run was not interrupted"

    resumed = _run(torchrun_cmd(cfg))
    _ok(resumed)
    summary = _summary(out)
    assert summary["resumed_from"] >= 4 and summary["steps"] == 10
    _assert_same_weights(final_weights(out, 10), reference)


def test_sigterm_saves_a_complete_checkpoint_and_exits_143(shards, tmp_path):
    import sys

    out = tmp_path / "run"
    cfg = write_train_config(tmp_path / "c.yaml", shards, str(out), train={"steps": 10_000}, checkpoint={"interval_steps": 3})
    # One rank, as a pod's main process gets the signal on preemption.
    proc = subprocess.Popen(
        [sys.executable, "-m", "m3i", "-q", "train", "--config", str(cfg)],
        env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    marker = out / "checkpoints" / "step-00000003" / "complete.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "training never reached step 3"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    grace = time.monotonic() - t0
    assert proc.returncode == 143, err[-3000:]
    assert "preempted: SIGTERM at step" in err
    steps = sorted(json.loads(p.read_text())["step"] for p in (out / "checkpoints").glob("step-*/complete.json"))
    assert steps[-1] > 3 and grace < 30  # a new, complete checkpoint well inside a 30 s grace period
    from m3i.artifacts import read_history

    assert [r["step"] for r in read_history(str(out))] == list(range(1, steps[-1] + 1))  # flushed with that checkpoint


def test_corrupt_shard_in_the_middle_is_skipped_and_counted(shards, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    index = json.loads((data / "index.json").read_text())
    middle = data / index["splits"]["train"]["shards"][len(index["splits"]["train"]["shards"]) // 2]["key"]
    middle.write_bytes(middle.read_bytes()[:2500])
    out = tmp_path / "run"
    r = _run(torchrun_cmd(write_train_config(tmp_path / "c.yaml", str(data), str(out), train={"steps": 16})))
    _ok(r)
    summary = _summary(out)
    assert summary["steps"] == 16
    assert summary["data_stats"]["shards_failed"] >= 1 and summary["data_stats"]["samples_padded"] > 0


@pytest.mark.parametrize(
    "zero, precision, resume_nproc",
    [(0, "bf16", 1), (1, "fp32", 1), (2, "bf16", 1), (3, "fp32", 2)],
)
def test_zero_stages_and_precisions_train_save_and_resume(shards, tmp_path, zero, precision, resume_nproc):
    out = tmp_path / "run"
    train = {"zero_stage": zero, "precision": precision, "steps": 2}
    _ok(_run(torchrun_cmd(write_train_config(tmp_path / "a.yaml", shards, str(out), train=train))))
    first = _summary(out)
    assert first["steps"] == 2 and first["resumed_from"] is None
    assert all(v == v for k, v in first["last_parts"].items() if k.startswith("loss"))  # finite
    # Resume to step 3, on the other world size where ZeRO allows it (2 -> 1 ranks).
    cfg = write_train_config(tmp_path / "b.yaml", shards, str(out), train={**train, "steps": 3})
    _ok(_run(torchrun_cmd(cfg, resume_nproc)))
    second = _summary(out)
    assert second["resumed_from"] == 2 and second["steps"] == 3 and second["world_size"] == resume_nproc


@pytest.mark.prometheus
def test_prometheus_scrapes_a_two_process_run(shards, tmp_path, prometheus_factory):
    from tests.prometheus import free_port_pair

    port = free_port_pair()
    out = tmp_path / "run"
    cfg = write_train_config(
        tmp_path / "c.yaml", shards, str(out),
        train={"steps": 100_000, "run_id": "prom-test"}, checkpoint={"interval_steps": 100_000},
        metrics={"port": port, "host": "127.0.0.1"},
    )
    prom = prometheus_factory([f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    proc = subprocess.Popen(torchrun_cmd(cfg), env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        steps = prom.wait_for_series('m3i_train_steps_total{run_id="prom-test"} > 2', 2, timeout=120)
        assert {s["metric"]["rank"] for s in steps} == {"0", "1"}
        loss = prom.wait_for_series('m3i_train_loss{part="loss_img"}', 2, timeout=30)
        assert all(0 < float(s["value"][1]) < 100 for s in loss)
        samples = prom.query("sum(m3i_train_samples_total)")
        assert float(samples[0]["value"][1]) > 0
        assert prom.query("m3i_train_lr") and prom.query("m3i_train_step_seconds_count")
        assert prom.query('m3i_train_branch_samples_total{branch="txt"} > 0')
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _cfg_here(tmp_path, shards, out, name="c", **sections):
    from m3i.config import load_config

    sections["data"] = {"num_workers": 0, **sections.get("data", {})}
    return load_config(None, write_train_config(tmp_path / f"{name}.yaml", shards, str(out), **sections))


def _in_process_train(monkeypatch, tmp_path, shards, bad_calls, checkpoint=None, metrics=None, data=None, **train):
    """Train in this process (one rank) with NaN losses on the given forward calls."""
    from m3i.train import loop

    one_rank_here(monkeypatch)
    real_build = loop.build_model
    calls = {"n": 0}

    def build_with_nans(cfg, num_classes=None):
        model = real_build(cfg, num_classes=num_classes)
        forward = model.forward

        def poisoned(batch):
            out = forward(batch)
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out["loss"] = out["loss"] * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(loop, "build_model", build_with_nans)
    out = tmp_path / "run"
    cfg = _cfg_here(tmp_path, shards, out, train=train, checkpoint=checkpoint or {}, metrics=metrics or {}, data=data or {})
    return out, lambda: loop.train(cfg, progress=False)


def test_a_nan_loss_skips_the_step_and_is_counted(shards, tmp_path, monkeypatch):
    out, run = _in_process_train(monkeypatch, tmp_path, shards, {3}, steps=4)
    summary = run()
    assert summary.steps == 4 and summary.skipped_steps == 1
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # scrapes leave TIME_WAIT entries behind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_failed_run_or_start_frees_its_metrics_port(shards, tmp_path, monkeypatch):
    """The metrics endpoint is closed however training ends: diverged, or a resume that finds nothing intact."""
    from m3i.storage import StorageError
    from m3i.train import TrainingDiverged, loop
    from tests.prometheus import free_port

    port = free_port()
    metrics = {"port": port, "host": "127.0.0.1"}
    out, run = _in_process_train(monkeypatch, tmp_path, shards, set(range(3, 100)), steps=6, max_bad_steps=2, metrics=metrics)
    with pytest.raises(TrainingDiverged):
        run()
    assert _port_is_free(port)
    ds = out / "checkpoints" / "step-00000002" / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(ds.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: found when the resume downloads and hashes it, after metrics started
    ds.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"no checkpoint .* from step-00000002 down verifies"):
        loop.train(_cfg_here(tmp_path, shards, out, name="again", train={"steps": 6}, metrics=metrics), progress=False)
    assert _port_is_free(port)


def test_train_stops_its_loader_workers_however_it_ends(shards, tmp_path, monkeypatch):
    """Two runs in one process (as tests/test_export.py trains its cases), one ending in an error:
    neither leaves a loader worker behind. Workers ignore SIGTERM, so a leftover one held the
    process at exit for ever (multiprocessing joins its children)."""
    import multiprocessing

    from m3i.train import TrainingDiverged, loop

    one_rank_here(monkeypatch)
    loop.train(_cfg_here(tmp_path, shards, tmp_path / "a", name="a", train={"steps": 2}, data={"num_workers": 1}), progress=False)
    assert multiprocessing.active_children() == []
    out, run = _in_process_train(monkeypatch, tmp_path, shards, set(range(2, 100)), steps=6, max_bad_steps=2, data={"num_workers": 1})
    with pytest.raises(TrainingDiverged):
        run()
    assert multiprocessing.active_children() == []


def test_nan_losses_in_a_row_abort_without_saving(shards, tmp_path, monkeypatch):
    from m3i.train import TrainingDiverged

    out, run = _in_process_train(monkeypatch, tmp_path, shards, set(range(4, 100)), steps=8, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row at step 3 \(train.max_bad_steps=3\)"):
        run()
    saved = sorted(p.parent.name for p in (out / "checkpoints").glob("*/complete.json"))
    assert saved == ["step-00000002"]  # the interval checkpoint before the NaNs, nothing after
    assert not (out / "checkpoints" / "step-00000003").exists()


@pytest.mark.s3
def test_trains_from_and_checkpoints_to_s3(shards, tmp_path, s3_bucket):
    from m3i.storage import open_store

    data = open_store(s3_bucket + "/data")
    for p in sorted(Path(shards).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            data.put_file(p.relative_to(shards).as_posix(), str(p))
    output = s3_bucket + "/runs/one"
    _ok(_run(torchrun_cmd(write_train_config(tmp_path / "a.yaml", data.uri, output, train={"steps": 2}))))
    run = open_store(output)
    assert run.exists("checkpoints/step-00000002/complete.json")
    assert json.loads(run.get_bytes("summary.json"))["steps"] == 2
    _ok(_run(torchrun_cmd(write_train_config(tmp_path / "b.yaml", data.uri, output, train={"steps": 6}))))
    summary = json.loads(run.get_bytes("summary.json"))
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    # Retention (keep_last=2): steps 4 and 6 remain, step 2 was deleted whole.
    tags = sorted({o.key.split("/")[1] for o in run.list("checkpoints/")})
    assert tags == ["step-00000004", "step-00000006"]


# ---------------------------------------------------------------------------------------------- history


HISTORY_KEYS = {"step", "time", "lr", "step_seconds", "data_wait_seconds"}
LOSS_KEYS = {"loss", "loss_img", "loss_cls", "loss_txt", "n_img", "n_cls", "n_txt", "acc_cls", "temperature", "target_std", "ema_momentum"}


def test_history_has_one_row_per_step_keeps_steps_once_over_a_resume_and_ships_with_the_export(shards, tmp_path, monkeypatch):
    import math

    from m3i.export import export
    from m3i.models import build_model
    from m3i.train import TrainingDiverged, loop
    from m3i.train.engine import lr_lambda, peak_lr
    from m3i.artifacts import read_history

    # Attempt 1 trains steps 1-4, checkpoints at 3, and dies at step 4 on a NaN: row 4 is not in a checkpoint.
    out, run = _in_process_train(monkeypatch, tmp_path, shards, set(range(5, 100)), checkpoint={"interval_steps": 3}, steps=6, max_bad_steps=1)
    with pytest.raises(TrainingDiverged):
        run()
    first = read_history(str(out))
    assert [r["step"] for r in first] == [1, 2, 3, 4]  # written after the failure too: the curve up to it
    between = time.time()

    # Attempt 2 resumes from step 3 and ends at 6: steps 1-3 of attempt 1 stay, its step 4 is replaced.
    monkeypatch.setattr(loop, "build_model", build_model)
    cfg = _cfg_here(tmp_path, shards, out, name="resume", train={"steps": 6}, checkpoint={"interval_steps": 3})
    summary = loop.train(cfg, progress=False)
    assert summary.resumed_from == 3 and summary.steps == 6
    rows = read_history(str(out))
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # in the file once each, in order
    assert rows[:3] == first[:3] and rows[3]["time"] > between > first[3]["time"]
    assert LOSS_KEYS <= set(summary.last_parts)
    peak, schedule = peak_lr(cfg, 1), lr_lambda(cfg, peak_lr(cfg, 1))
    for row in rows:
        assert set(row) == HISTORY_KEYS | set(summary.last_parts), row
        assert all(isinstance(row[k], (int, float)) and math.isfinite(row[k]) for k in row)
        assert row["lr"] == pytest.approx(peak * schedule(row["step"] - 1))  # the rate the step applied
        assert row["step_seconds"] > 0 and row["data_wait_seconds"] >= 0
    assert {k: rows[-1][k] for k in summary.last_parts} == pytest.approx(summary.last_parts)

    result = export(_cfg_here(tmp_path, shards, out, name="export", export={"checkpoint": str(out), "out": str(tmp_path / "models")}))
    assert result.step == 6 and result.history is not None
    assert read_history(result.uri) == rows
    assert "history.jsonl" in (Path(result.uri) / "SHA256SUMS").read_text()


# ---------------------------------------------------------------------------------------------- train.init_from


def _export_of_a_fake_run(tmp_path, name="base", **sections) -> tuple[str, dict]:
    """An `m3i export` of a model with perturbed backbone weights (no training); returns (uri, its weights)."""
    from safetensors.torch import load_file

    from m3i.models import build_model
    from tests.test_export import _cfg, _export, _fake_zero0_checkpoint

    cfg = _cfg(tmp_path, **sections)
    torch.manual_seed(123)
    model = build_model(cfg, num_classes=4)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _fake_zero0_checkpoint(tmp_path / f"{name}-run", cfg, model, step=7)
    result = _export(tmp_path, str(tmp_path / f"{name}-run"), str(tmp_path / "models"), name=name)
    return result.uri, load_file(result.weights)


def test_init_from_an_export_starts_the_run_from_exactly_its_backbone(shards, tmp_path, monkeypatch):
    from m3i.models import build_model
    from m3i.train import loop

    uri, weights = _export_of_a_fake_run(tmp_path)
    one_rank_here(monkeypatch)
    seen = {}

    def build_and_remember(cfg, num_classes=None):
        model = build_model(cfg, num_classes=num_classes)
        seen["built"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def engine_and_remember(cfg, model, world_size):
        seen["engine"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_engine(cfg, model, world_size)

    real_engine = loop.build_engine
    monkeypatch.setattr(loop, "build_model", build_and_remember)
    monkeypatch.setattr(loop, "build_engine", engine_and_remember)
    out = tmp_path / "run"
    loop.train(_cfg_here(tmp_path, shards, out, train={"steps": 1, "init_from": uri, "seed": 5}), progress=False)

    built, loaded = seen["built"], seen["engine"]
    for prefix in ("backbone.", "target.backbone."):
        got = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
        assert got.keys() == weights.keys() and len(got) > 50
        assert all(torch.equal(got[k], weights[k]) for k in weights), prefix
        assert not any(torch.equal(built[prefix + k], weights[k]) for k in weights if weights[k].numel() > 1)  # not by chance
    rest = [k for k in built if not k.startswith(("backbone.", "target.backbone."))]
    assert any(k.startswith("projector.") for k in rest) and any(k.startswith("text_encoder.") for k in rest)
    assert all(torch.equal(loaded[k], built[k]) for k in rest)  # projector, predictor, heads, text encoder: fresh
    meta = json.loads((out / "checkpoints" / "step-00000001" / "complete.json").read_text())
    assert meta["init_from"] == {"uri": uri, "kind": "exported", "name": "base", "step": 7, "modules": ["backbone", "target.backbone"]}

    # A resume takes the run's own checkpoint: init_from is not read again (here it would not even exist).
    cfg = _cfg_here(tmp_path, shards, out, name="resume", train={"steps": 2, "init_from": str(tmp_path / "gone"), "seed": 5})
    assert loop.train(cfg, progress=False).resumed_from == 1
    meta = json.loads((out / "checkpoints" / "step-00000002" / "complete.json").read_text())
    assert meta["init_from"]["uri"] == uri  # the weights' origin stays on record


def test_init_from_a_run_folder_loads_its_latest_checkpoints_online_encoder(tmp_path):
    from m3i.models import build_model
    from m3i.train.init_from import init_backbone
    from tests.test_export import _cfg, _fake_zero0_checkpoint

    cfg = _cfg(tmp_path)
    source = build_model(cfg, num_classes=4)
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.add_(1.0)
    _fake_zero0_checkpoint(tmp_path / "run", cfg, source, step=2)
    run_cfg = _cfg(tmp_path, train={"init_from": str(tmp_path / "run")}, objective={"use_img": False})
    model = build_model(run_cfg, num_classes=4)
    loaded = init_backbone(run_cfg, model)
    assert loaded["kind"] == "checkpoint" and loaded["step"] == 2 and loaded["modules"] == ["backbone"]  # no EMA target
    want = source.backbone.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.backbone.state_dict().items())


@pytest.mark.parametrize(
    "sections, differs",
    [
        ({"model": {"patch_size": 4}}, r"patch size \(4, 4\) != \(8, 8\)"),
        ({"data": {"image_size": 64}}, r"image size \(64, 64\) != \(32, 32\)"),
        ({"model": {"global_pool": "max"}}, r"global pool max != avg"),
        ({"model": {"backbone": "m3i_vit_tiny"}}, r"depth \d+ != 4; width \d+ != 96"),
    ],
)
def test_init_from_another_encoder_is_a_value_error_saying_what_differs(tmp_path, sections, differs):
    from m3i.models import build_model
    from m3i.train.init_from import init_backbone
    from tests.test_export import _cfg

    uri, _ = _export_of_a_fake_run(tmp_path, **sections)
    cfg = _cfg(tmp_path, train={"init_from": uri})
    model = build_model(cfg, num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train\.init_from=.*does not fit this run's backbone.*" + differs):
        init_backbone(cfg, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(ValueError, match=r"train\.init_from=.* holds neither an m3i export"):
        init_backbone(_cfg(tmp_path, train={"init_from": str(tmp_path / "nothing")}), model)


def test_train_refuses_a_mismatched_init_from_before_building_the_engine(shards, tmp_path, monkeypatch):
    from m3i.train import loop

    uri, _ = _export_of_a_fake_run(tmp_path, model={"patch_size": 4})
    one_rank_here(monkeypatch)
    monkeypatch.setattr(loop, "build_engine", lambda *a: pytest.fail("the engine was built"))
    with pytest.raises(ValueError, match=r"train\.init_from=.*patch size"):
        loop.train(_cfg_here(tmp_path, shards, tmp_path / "run", train={"init_from": uri}), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
