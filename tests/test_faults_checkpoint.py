"""Checkpoint faults of issue #14, "Nothing lost, nothing run that should not be".

1. A planted pickle in a checkpoint never runs on resume: rank state is JSON + safetensors, and
   DeepSpeed's own files are read weights-only with a short allow-list.
2. A damaged newest checkpoint (marker not JSON, a truncated or altered file) is skipped with
   the reason, and resume and export take the newest one that verifies.
3. A save that fails (storage down past its retries, no room to stage) does not end training
   until ``checkpoint.max_consecutive_failures`` in a row; the final save must succeed.
4. A ZeRO-2/3 checkpoint written by 2 ranks resumes on 1 and on 3 with its Adam moments.

Most tests start from one real one-rank run made once for the module (checkpoints at steps 2
and 4) and tamper with a copy of it, as someone with write access to the bucket could.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tests.helpers import PlantedPickle, one_rank_here, shard_small, small_demo, train_env, write_train_config

REPO = Path(__file__).resolve().parents[1]
DS_MODEL = "ds/mp_rank_00_model_states.pt"


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ckpt-data")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


def _config_file(tmp: Path, shards: str, out: Path | str, name: str = "c", **sections) -> Path:
    """TINY_TRAIN in this process (no loader workers), staging under ``tmp/staging``."""
    sections["data"] = {"num_workers": 0, **sections.get("data", {})}
    sections["checkpoint"] = {"staging_dir": str(tmp / "staging"), **sections.get("checkpoint", {})}
    return write_train_config(tmp / f"{name}.yaml", shards, str(out), **sections)


def _cfg(tmp: Path, shards: str, out: Path | str, name: str = "c", **sections):
    from m3i.config import load_config

    return load_config(None, _config_file(tmp, shards, out, name, **sections))


def _train(tmp: Path, shards: str, out: Path | str, **sections):
    from m3i.train import loop

    return loop.train(_cfg(tmp, shards, out, **sections), progress=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shards) -> Path:
    """A one-rank run of 4 steps in this process: intact checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        one_rank_here(mp)
        _train(root, shards, root / "run", train={"steps": 4})
    return root / "run"


@pytest.fixture
def run(base_run, tmp_path, monkeypatch) -> Path:
    """A private copy of the base run, and this process set up as a one-rank job."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    one_rank_here(monkeypatch)
    return out


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def _rewrite_manifest(ckpt: Path, drop: tuple[str, ...] = (), add: tuple[str, ...] = (), sha: bool = True) -> None:
    """Recompute ``complete.json``'s file list from what is in ``ckpt`` now, as an attacker with write access could."""
    manifest = json.loads((ckpt / "complete.json").read_text())
    keys = [f["key"] for f in manifest["files"] if f["key"] not in drop] + list(add)
    files = []
    for key in sorted(keys):
        entry = {"key": key, "bytes": (ckpt / key).stat().st_size}
        if sha:
            entry["sha256"] = hashlib.sha256((ckpt / key).read_bytes()).hexdigest()
        files.append(entry)
    manifest["files"] = files
    (ckpt / "complete.json").write_text(json.dumps(manifest))


def _capture_metrics(monkeypatch) -> dict:
    from m3i.train import loop

    seen = {}
    real = loop.build_metrics

    def build(*a, **kw):
        seen["metrics"] = real(*a, **kw)
        return seen["metrics"]

    monkeypatch.setattr(loop, "build_metrics", build)
    return seen


def _sample(metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"rank": "0", "run_id": metrics.run_id})


def _fail_uploads(monkeypatch, when) -> list[str]:
    """Make every upload of a checkpoint file whose key ``when`` accepts fail as S3 does after its retries."""
    from m3i.storage import LocalStore, StorageError

    failed = []
    real = LocalStore.put_file

    def put_file(self, key, path, metadata=None):
        if when(key):
            failed.append(key)
            raise StorageError(f"put s3://bucket/{key} failed after 5 attempts on http://127.0.0.1:9: connection refused")
        return real(self, key, path, metadata)

    monkeypatch.setattr(LocalStore, "put_file", put_file)
    return failed


def _staged_files(tmp: Path) -> list[str]:
    return [p.name for p in (tmp / "staging").rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------- 1. code in storage


def _error_of(fn) -> Exception | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


@pytest.mark.slow
@pytest.mark.parametrize("as_file", ["rank-00000.safetensors", "rank-00000.pt"])
def test_planted_pickle_in_rank_state_does_not_run(run, shards, tmp_path, as_file):
    marker = tmp_path / "pwned"
    ckpt = _ckpt(run, 4)
    for old in ("rank-00000.safetensors", "rank-00000.pt"):
        (ckpt / old).unlink(missing_ok=True)
    # A rank state with the payload inside, under the current name or the legacy .pt one.
    torch.save({"loader": {"epoch": 0}, "rng": PlantedPickle(marker)}, ckpt / as_file)
    _rewrite_manifest(ckpt, drop=("rank-00000.safetensors", "rank-00000.pt"), add=(as_file,))
    err = _error_of(lambda: _train(tmp_path, shards, run, train={"steps": 6}))
    assert not marker.exists(), "the planted pickle ran"
    from m3i.train.checkpoint import UnsafeCheckpointError

    assert isinstance(err, UnsafeCheckpointError), err
    assert re.search(rf"{as_file}: (not an m3i state file|refused: its pickle imports \['posix.system'\])", str(err)), err
    assert json.loads((ckpt / "complete.json").read_text())["step"] == 4  # nothing saved over it


@pytest.mark.slow
def test_planted_pickle_in_a_deepspeed_file_does_not_run(run, shards, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    ckpt = _ckpt(run, 4)
    from m3i.artifacts.zero import load_weights_only
    from m3i.train.safe_state import deepspeed_globals

    state = load_weights_only(ckpt / DS_MODEL, "cpu", deepspeed_globals())
    state["meta"]["note"] = PlantedPickle(marker)
    torch.save(state, ckpt / DS_MODEL)
    _rewrite_manifest(ckpt)
    err = _error_of(lambda: _train(tmp_path, shards, run, train={"steps": 6}))
    assert not marker.exists(), "the planted pickle ran"
    from m3i.train.checkpoint import Checkpointer, UnsafeCheckpointError

    assert isinstance(err, UnsafeCheckpointError) and "mp_rank_00_model_states.pt: refused: its pickle imports ['posix.system']" in str(err), err
    # Without the check before loading, DeepSpeed's own load refuses it: its checkpoint engine is weights-only.
    monkeypatch.setattr(Checkpointer, "_check_pickles", lambda *a: None)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states.pt: refused to unpickle it"):
        _train(tmp_path, shards, run, name="again", train={"steps": 6})
    assert not marker.exists(), "DeepSpeed ran the planted pickle"


def test_rank_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    from m3i.train.safe_state import load_state, save_state

    state = {"loader": {"epoch": 3, "batches_consumed": 7, "index_plan_sha256": None},
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    save_state(state, tmp_path / "r.safetensors")
    back = load_state(tmp_path / "r.safetensors")
    assert back["loader"] == state["loader"] and back["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    np.testing.assert_array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])
    with pytest.raises(TypeError, match=r"state.rng.f: a \w+ cannot be saved as JSON"):
        save_state({"rng": {"f": len}}, tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- 2. damage


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty complete.json", "truncated file", "same-size damage"])
def test_damaged_newest_checkpoint_falls_back_on_resume(run, shards, tmp_path, caplog, damage):
    ckpt = _ckpt(run, 4)
    if damage == "empty complete.json":
        (ckpt / "complete.json").write_text("")
        reason = r"complete.json is unreadable"
    elif damage == "truncated file":
        data = (ckpt / DS_MODEL).read_bytes()
        (ckpt / DS_MODEL).write_bytes(data[: len(data) // 2])
        reason = rf"{DS_MODEL} has {len(data) // 2} bytes, complete.json says {len(data)}"
    else:  # passes the listing; only the hash tells
        data = bytearray((ckpt / DS_MODEL).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / DS_MODEL).write_bytes(bytes(data))
        reason = rf"{DS_MODEL} does not have the sha256 complete.json records"
    with caplog.at_level(logging.WARNING, logger="m3i"):
        summary = _train(tmp_path, shards, run, train={"steps": 5})
    assert summary.resumed_from == 2 and summary.steps == 5
    assert any("step-00000004 skipped" in r.message and re.search(reason, r.message) for r in caplog.records), caplog.text


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_on_export(run):
    from m3i.artifacts import locate_checkpoint
    from m3i.storage import StorageError

    ckpt = _ckpt(run, 4)
    original = (ckpt / DS_MODEL).read_bytes()
    (ckpt / "complete.json").write_text("{not json")
    assert locate_checkpoint(str(run)).step == 2
    (ckpt / "complete.json").write_text(json.dumps({"step": 4}))
    assert locate_checkpoint(str(run)).step == 2
    _rewrite_manifest_marker(ckpt)
    (ckpt / DS_MODEL).write_bytes(original[:1000])
    assert locate_checkpoint(str(run)).step == 2
    with pytest.raises(ValueError, match=rf"step-00000004' is damaged: {DS_MODEL} has 1000 bytes"):
        locate_checkpoint(str(ckpt))  # named explicitly: no silent substitute
    # Same size, other bytes: found on first use, with the way out named.
    (ckpt / DS_MODEL).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    src = locate_checkpoint(str(run))
    assert src.step == 4
    with pytest.raises(StorageError, match=r"step-00000004 is damaged: .*sha256.*next older intact checkpoint is .*step-00000002"):
        src.path(DS_MODEL)


def _rewrite_manifest_marker(ckpt: Path) -> None:
    """A fresh ``complete.json`` for the files in ``ckpt`` now (replacing a damaged one)."""
    files = []
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.name != "complete.json":
            key = p.relative_to(ckpt).as_posix()
            files.append({"key": key, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    (ckpt / "complete.json").write_text(json.dumps({"step": int(ckpt.name[5:]), "world_size": 1, "files": files}))


@pytest.mark.slow
def test_checkpoint_without_hashes_and_with_a_pickled_rank_file_still_resumes_exactly(run, shards, tmp_path, monkeypatch):
    from m3i.train import state as train_state
    from m3i.train.safe_state import load_state

    ckpt = _ckpt(run, 4)
    state = load_state(ckpt / "rank-00000.safetensors")
    (ckpt / "rank-00000.safetensors").unlink()
    torch.save(state, ckpt / "rank-00000.pt")  # as checkpoints before this change stored it
    _rewrite_manifest(ckpt, drop=("rank-00000.safetensors",), add=("rank-00000.pt",), sha=False)
    restored = {}
    real = train_state._set_rng_state
    monkeypatch.setattr(train_state, "_set_rng_state", lambda s: (restored.update(s), real(s)))
    summary = _train(tmp_path, shards, run, train={"steps": 5})
    assert summary.resumed_from == 4
    assert restored["python"] == state["rng"]["python"] and torch.equal(restored["torch"], state["rng"]["torch"])


@pytest.mark.slow
def test_no_intact_checkpoint_is_a_clear_error_not_a_fresh_start(run, shards, tmp_path):
    from m3i.storage import StorageError

    (_ckpt(run, 4) / "complete.json").write_text("")
    (_ckpt(run, 2) / DS_MODEL).write_bytes(b"")
    with pytest.raises(StorageError, match=r"2 checkpoint\(s\) .* claim completion but none verifies .*checkpoint.resume=false"):
        _train(tmp_path, shards, run, train={"steps": 6})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]  # nothing new, nothing pruned


# ---------------------------------------------------------------------------------------------- 3. failed saves


def _s3_outage(monkeypatch, when) -> list[str]:
    """Refuse connections for uploads of the objects ``when`` accepts: the real S3 store retries, then gives up."""
    from minio import Minio

    failed = []
    real = Minio.fput_object

    def fput_object(self, bucket, name, *a, **kw):
        if when(name):
            failed.append(name)
            raise ConnectionError(f"[Errno 111] Connection refused: {name}")
        return real(self, bucket, name, *a, **kw)

    monkeypatch.setattr(Minio, "fput_object", fput_object)
    return failed


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_storage_outage_during_saves_does_not_end_training(shards, tmp_path, monkeypatch, request, backend):
    from m3i.storage import open_store

    one_rank_here(monkeypatch)
    seen = _capture_metrics(monkeypatch)
    down = lambda key: "/step-00000002/" in key or "/step-00000004/" in key  # noqa: E731
    if backend == "s3":
        out = request.getfixturevalue("s3_bucket") + "/run"
        failed = _s3_outage(monkeypatch, down)
    else:
        out = str(tmp_path / "run")
        failed = _fail_uploads(monkeypatch, down)
    summary = _train(tmp_path, shards, out, train={"steps": 6})
    assert summary.steps == 6 and summary.checkpoint.endswith("step-00000006")
    markers = [o.key for o in open_store(out).list("checkpoints/") if o.key.endswith("/complete.json")]
    assert failed and markers == ["checkpoints/step-00000006/complete.json"]
    assert _sample(seen["metrics"], "m3i_train_checkpoint_failures_total") == 2
    assert _sample(seen["metrics"], "m3i_train_checkpoint_seconds_count") == 3
    assert _staged_files(tmp_path) == []  # the failed saves' staging files are gone


@pytest.mark.slow
def test_failed_saves_in_a_row_end_the_job_and_no_room_names_the_folder(shards, tmp_path, monkeypatch, caplog):
    from m3i.storage import StorageError

    one_rank_here(monkeypatch)
    seen = _capture_metrics(monkeypatch)
    real_usage = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000) if "staging" in str(p) else real_usage(p))
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="m3i"):
        with pytest.raises(StorageError, match=r"checkpoint step-00000004 not saved: the staging folder .*staging.* has 1000 bytes free, the checkpoint needs about \d+ bytes"):
            _train(tmp_path, shards, out, train={"steps": 8}, checkpoint={"max_consecutive_failures": 2})
    assert "checkpoint step 2 failed (1 in a row, checkpoint.max_consecutive_failures=2); training goes on" in caplog.text
    assert not list(out.glob("checkpoints/*/complete.json"))
    assert _sample(seen["metrics"], "m3i_train_checkpoint_failures_total") == 2
    assert _staged_files(tmp_path) == []


@pytest.mark.slow
def test_failed_final_save_fails_the_job(shards, tmp_path, monkeypatch, capsys):
    from m3i.cli import main

    one_rank_here(monkeypatch)
    _fail_uploads(monkeypatch, lambda key: "/step-00000003/" in key)
    out = tmp_path / "run"
    config = _config_file(tmp_path, shards, out, train={"steps": 3}, checkpoint={"interval_steps": 10})
    assert main(["-q", "train", "--config", str(config)]) == 1
    assert "m3i train: failed: checkpoint step-00000003 was not completed" in capsys.readouterr().err
    assert not (out / "summary.json").exists() and not list(out.glob("checkpoints/*/complete.json"))


def test_max_consecutive_failures_is_validated():
    from m3i.config import CheckpointConfig

    assert CheckpointConfig().max_consecutive_failures == 3
    with pytest.raises(ValueError, match=r"checkpoint.max_consecutive_failures=0"):
        CheckpointConfig(max_consecutive_failures=0)


# ---------------------------------------------------------------------------------------------- 4. another world size

_DUMP = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from safetensors.torch import save_file
from m3i.config import load_config
from m3i.data import ShardLoader
from m3i.models import build_model
from m3i.train.checkpoint import Checkpointer
from m3i.train.dist import init_distributed
from m3i.train.ema import EMAUpdater
from m3i.train.engine import build_engine
from m3i.transforms import build_transform

info = init_distributed("gloo")
import deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state


def dump(cfg, path):
    loader = ShardLoader(cfg.data, build_transform(cfg, train=True), rank=info.rank, world_size=info.world_size)
    model = build_model(cfg, num_classes=cfg.model.num_classes or loader.num_classes)
    engine, _, scheduler = build_engine(cfg, model, info.world_size)
    ema = EMAUpdater(engine.module, zero3=cfg.train.zero_stage == 3, fp32_master=cfg.train.precision != "fp32")
    ckpt = Checkpointer(cfg.checkpoint, cfg.train.output, info, "dump")
    restored = ckpt.load(engine, ckpt.latest())
    ema.load_state_dict(restored.client_state.get("ema", dict()))
    out = dict()
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out["master/" + name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key + "/" + name] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=cfg.train.zero_stage == 3):
        for name, p in engine.module.named_parameters():
            out["module/" + name] = p.detach().cpu().clone()
    for i, piece in enumerate(ema.master or []):
        pieces = [torch.empty_like(piece) for _ in range(info.world_size)]
        dist.all_gather(pieces, piece.contiguous())
        out["ema/" + str(i)] = torch.cat(pieces)
    base = engine.optimizer.optimizer
    facts = dict(
        adam_steps=sorted({{float(s["step"]) for s in base.state.values()}}),
        lr=[g["lr"] for g in engine.optimizer.param_groups],
        scheduler_epoch=scheduler.last_epoch, global_steps=engine.global_steps,
        client_step=restored.client_state["step"], rank_state=restored.rank_state is not None, tag=restored.ref.tag,
    )
    if info.is_main:
        save_file(out, path, metadata=dict(facts=json.dumps(facts)))


# Several runs in one launch: starting Python, torch and DeepSpeed is most of a short run.
if sys.argv[1] == "train":  # the real training loop, each config in turn
    from m3i.train.loop import train

    for config in sys.argv[2:]:
        train(load_config(None, config), info, progress=False)
else:
    for config, path in zip(sys.argv[2::2], sys.argv[3::2]):
        dump(load_config(None, config), path)
"""

def _ds_moments(ckpt: Path, stage: int, world: int) -> dict[str, torch.Tensor]:
    """``exp_avg/<name>`` of every trainable parameter, rebuilt from DeepSpeed's own per-rank optimizer shards."""
    from m3i.artifacts.zero import load_state

    optim = [load_state(next((ckpt / "ds").glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")))["optimizer_state_dict"] for r in range(world)]
    out: dict[str, torch.Tensor] = {}
    if stage == 2:  # each rank holds slices of the flat groups; param_slice_mappings says which
        for r, osd in enumerate(optim):
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                flat = osd["base_optimizer_state"][g]["exp_avg"]
                for name, frag in mapping.items():
                    out[name] = torch.cat([out.get(name, flat[:0]), flat.narrow(0, frag.start, frag.numel)])
        return {f"exp_avg/{k}": v for k, v in out.items()}
    # ZeRO-3: each parameter is cut in ceil(n / world) pieces, one per rank, in group order.
    shapes = load_state(ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    for g, group in enumerate(shapes):
        offset = 0
        for name, shape in group.items():
            n = int(torch.Size(shape).numel())
            part = -(-n // world)
            pieces = [osd["optimizer_state_dict"]["state"][g]["exp_avg"][offset : offset + part] for osd in optim]
            out[f"exp_avg/{name}"] = torch.cat(pieces)[:n]
            offset += part
    return out


WORLD_CASES = {"zero2-fp32": (2, "fp32"), "zero3-bf16": (3, "bf16")}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, shards) -> dict[str, Path]:
    """Each case trained for 2 steps by 2 ranks (the training loop), then resumed on 1 and on 3 ranks and dumped."""
    root = tmp_path_factory.mktemp("world")
    configs = {}
    for case, (zero, precision) in WORLD_CASES.items():
        sections = dict(train={"zero_stage": zero, "precision": precision, "steps": 2}, data={"num_workers": 0})
        configs[case] = write_train_config(root / f"{case}.yaml", shards, str(root / case), **sections)
    script = root / "resume.py"
    script.write_text(_DUMP.format(repo=str(REPO)))

    def launch(nproc: int, *args) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *map(str, args)]
        r = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-5000:]

    launch(2, "train", *configs.values())
    for nproc in (1, 3):
        launch(nproc, "dump", *[x for case, c in configs.items() for x in (c, root / f"{case}-{nproc}.safetensors")])
    return {"root": root}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(WORLD_CASES))
def test_resume_on_another_world_size_restores_adam_moments(resharded, case):
    from safetensors import safe_open

    from m3i.train.reshard import FILE
    from m3i.train.safe_state import load_state

    zero, _ = WORLD_CASES[case]
    ckpt = _ckpt(resharded["root"] / case, 2)
    saved = load_state(ckpt / FILE)
    tensors = saved["tensors"]
    # The world-size-independent copy is what DeepSpeed's own 2-rank shards hold.
    for key, value in _ds_moments(ckpt, zero, 2).items():
        assert torch.equal(value, tensors[key].reshape(-1)), key
    for nproc in (1, 3):
        with safe_open(str(resharded["root"] / f"{case}-{nproc}.safetensors"), "pt") as f:
            facts = json.loads(f.metadata()["facts"])
            got = {k: f.get_tensor(k) for k in f.keys()}
        assert facts == {"adam_steps": [2.0], "lr": [g["lr"] for g in saved["param_groups"]], "scheduler_epoch": 2,
                         "global_steps": 2, "client_step": 2, "rank_state": False, "tag": "step-00000002"}, nproc
        for name in saved["params"]:
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(got[f"{key}/{name}"], tensors[f"{key}/{name}"]), f"{nproc} ranks: {key} of {name}"
            assert torch.equal(got[f"module/{name}"], tensors[f"master/{name}"].to(got[f"module/{name}"].dtype)), name
        if zero == 3:  # the rest ZeRO-3 partitions too: frozen EMA target and its float32 master
            frozen = [k[len("frozen/"):] for k in tensors if k.startswith("frozen/")]
            assert frozen and all(torch.equal(got[f"module/{n}"], tensors[f"frozen/{n}"]) for n in frozen)
            ema = [k for k in tensors if k.startswith("ema/")]
            assert ema and all(torch.equal(got[k][: tensors[k].numel()], tensors[k].reshape(-1)) for k in ema)
