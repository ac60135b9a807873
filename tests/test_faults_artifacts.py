"""Unsafe and damaged artifacts wherever they are read (issue #22 item 5): one line, exit 1, nothing run.

The probes of the issue, through the command line as a user meets them: a planted pickle in a
checkpoint given to ``train.init_from``, ``m3i export`` and ``m3i evaluate --model`` (resume's
refusal is tests/test_faults_checkpoint.py's); a truncated ``model.safetensors`` given to
``m3i evaluate --model`` and ``train.init_from``; a data set whose shards were deleted, given to
``m3i train`` and ``m3i evaluate``; and a damaged candidate or champion in ``m3i.promote``. Each
ends in :class:`m3i.artifacts.ArtifactError` and, on the command line, in one line on stderr that
names the artifact, what is wrong and the way out, with exit status 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import PlantedPickle, one_rank_here, shard_small, small_demo, write_train_config
from tests.test_export import _fake_zero0_checkpoint

DS_MODEL = "ds/mp_rank_00_model_states.pt"
EVAL = {"k": 5, "probe_epochs": 2, "random_init": False, "num_workers": 0, "batch_size": 16}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifact-data")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return root / "shards"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A tiny run's checkpoint (laid out as a ZeRO-0 fp32 save) and its real ``m3i export``."""
    from m3i.config import load_config
    from m3i.export import export
    from m3i.models import build_model

    root = tmp_path_factory.mktemp("artifact-run")
    cfg_file = write_train_config(root / "train.yaml", "unused", "unused")
    cfg = load_config(None, cfg_file)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4)
    _fake_zero0_checkpoint(root / "run", cfg, model, step=2)
    r = export(load_config(None, cfg_file, [f"export.checkpoint={root / 'run'}", f"export.out={root / 'models'}"]))
    return {"run": root / "run", "export": Path(r.uri)}


def _config(tmp: Path, shards: Path, out: Path, **sections) -> Path:
    sections["evaluate"] = {**EVAL, **sections.get("evaluate", {})}
    return write_train_config(tmp / "c.yaml", str(shards), str(out), **sections)


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``m3i <args>`` in this process: its exit status and its stderr lines (logging goes elsewhere)."""
    from m3i.cli import main

    capsys.readouterr()
    rc = main(["--quiet", *args])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _planted_run(made: dict, tmp: Path, marker: Path) -> Path:
    """A copy of the run whose DeepSpeed file carries a pickle that runs a command, its manifest made to match."""
    run = tmp / "planted-run"
    shutil.copytree(made["run"], run)
    ckpt = run / "checkpoints" / "step-00000002"
    state = torch.load(ckpt / DS_MODEL, weights_only=True)
    state["meta"]["note"] = PlantedPickle(marker)
    torch.save(state, ckpt / DS_MODEL)
    manifest = json.loads((ckpt / "complete.json").read_text())
    manifest["files"] = [{"key": DS_MODEL, "bytes": (ckpt / DS_MODEL).stat().st_size}]  # as someone with write access would
    (ckpt / "complete.json").write_text(json.dumps(manifest))
    return run


def _truncated_export(made: dict, tmp: Path, manifest: bool) -> Path:
    """A copy of the export whose ``model.safetensors`` lost its second half (with or without its ``export.json``)."""
    folder = tmp / "truncated-export"
    shutil.copytree(made["export"], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    if not manifest:
        (folder / "export.json").unlink()
    return folder


def _one_refusal(rc: int, err: list[str], command: str) -> str:
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"m3i {command}: failed: "), (rc, err)
    assert "Traceback" not in err[0] and "weights_only=False" not in err[0] and "weights_only` set to `False" not in err[0], err
    return err[0]


# ---------------------------------------------------------------------------------------------- a planted pickle


@pytest.mark.parametrize("probe", ["train.init_from", "export", "evaluate --model"])
def test_planted_pickle_is_refused_in_one_line_and_never_runs(probe, made, shards, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    run = _planted_run(made, tmp_path, marker)
    cfg = _config(tmp_path, shards, tmp_path / "out", data={"num_workers": 0})
    if probe == "train.init_from":
        one_rank_here(monkeypatch)
        rc, err = _cli(capsys, "train", "--no-progress", "--config", str(cfg), "--set", f"train.init_from={run}")
        command = "train"
    elif probe == "export":
        rc, err = _cli(capsys, "export", "--config", str(cfg), "--checkpoint", str(run), "--out", str(tmp_path / "models"))
        command = "export"
    else:
        rc, err = _cli(capsys, "evaluate", "--config", str(cfg), "--model", str(run), "--out", str(tmp_path / "eval"))
        command = "evaluate"
    line = _one_refusal(rc, err, command)
    assert not marker.exists(), "the planted pickle ran"
    # The same refusal as a resume gives (tests/test_faults_checkpoint.py), naming the file and what it would import.
    assert f"{DS_MODEL}: refused to unpickle it: it holds more than tensors and plain data" in line, line
    assert "posix.system" in line and "check who can write the checkpoint bucket" in line, line
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


def test_planted_pickle_raises_the_one_unsafe_error_from_the_library(made, tmp_path):
    from m3i.artifacts import ArtifactError, UnsafeCheckpointError
    from m3i.models.pretrained import load_encoder
    from m3i.train.checkpoint import UnsafeCheckpointError as ResumeRefusal

    marker = tmp_path / "pwned"
    run = _planted_run(made, tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_encoder(str(run))
    assert isinstance(e.value, ArtifactError) and ResumeRefusal is UnsafeCheckpointError and not marker.exists()


# ---------------------------------------------------------------------------------------------- a truncated model.safetensors


@pytest.mark.parametrize("probe", ["evaluate --model", "train.init_from"])
@pytest.mark.parametrize("listed", [True, False], ids=["with export.json", "bare folder"])
def test_truncated_model_safetensors_is_refused_in_one_line(probe, listed, made, shards, tmp_path, capsys, monkeypatch):
    folder = _truncated_export(made, tmp_path, manifest=listed)
    cfg = _config(tmp_path, shards, tmp_path / "out", data={"num_workers": 0})
    if probe == "train.init_from":
        one_rank_here(monkeypatch)
        rc, err = _cli(capsys, "train", "--no-progress", "--config", str(cfg), "--set", f"train.init_from={folder}")
        command = "train"
    else:
        rc, err = _cli(capsys, "evaluate", "--config", str(cfg), "--model", str(folder), "--out", str(tmp_path / "eval"))
        command = "evaluate"
    line = _one_refusal(rc, err, command)
    size = (folder / "model.safetensors").stat().st_size
    if listed:  # export.json says what the file should be
        assert f"exported model {folder} is damaged: model.safetensors has {size} bytes, export.json lists {2 * size}" in line, line
    else:
        assert f"exported model {folder} is damaged: model.safetensors is not a readable safetensors file (SafetensorError" in line, line
    assert line.endswith("export the checkpoint again, or copy the version folder from where it is intact"), line


def test_same_size_damage_to_model_safetensors_is_found_by_its_sha256(made, tmp_path):
    from m3i.artifacts import DamagedArtifactError
    from m3i.models.pretrained import load_exported

    folder = tmp_path / "altered-export"
    shutil.copytree(made["export"], folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a weight's last byte: the file still parses
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DamagedArtifactError, match="model.safetensors does not have the sha256 export.json lists"):
        load_exported(str(folder))


# ---------------------------------------------------------------------------------------------- a data set missing shards


@pytest.mark.parametrize("probe", ["train", "evaluate"])
def test_data_set_whose_shards_were_deleted_is_refused_in_one_line_before_any_worker_starts(probe, made, shards, tmp_path, capsys, monkeypatch):
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    split = "train"  # the split both read first
    gone = sorted(p.relative_to(data).as_posix() for p in (data / split).glob("*.tar"))[0]
    (data / gone).unlink()
    total = len(list((data / split).glob("*.tar"))) + 1
    # Loader workers on: the check must come before they start, not as a worker's traceback.
    cfg = _config(tmp_path, data, tmp_path / "out", data={"num_workers": 1}, evaluate={"num_workers": 1})
    if probe == "train":
        one_rank_here(monkeypatch)
        rc, err = _cli(capsys, "train", "--no-progress", "--config", str(cfg))
    else:
        rc, err = _cli(capsys, "evaluate", "--config", str(cfg), "--model", str(made["export"]), "--out", str(tmp_path / "eval"))
    line = _one_refusal(rc, err, probe)
    assert f"data set {data} is damaged: 1 of {total} shards of split '{split}' that index.json lists are missing: {gone}" in line, line
    assert line.endswith("re-run the same `m3i shard` to write them again"), line
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "eval").exists()


def test_a_re_run_of_m3i_shard_writes_the_deleted_shards_again(tmp_path, shards):
    """The way out the message names works: the same `m3i shard` restores the shard, and the check passes."""
    from m3i.artifacts import check_shards, read_index
    from m3i.storage import open_store

    raw = small_demo(tmp_path / "raw")
    data = tmp_path / "shards"
    index = shard_small(raw, str(data))
    gone = index.shards("train")[0].key
    (data / gone).unlink()
    shard_small(raw, str(data))
    store = open_store(str(data))
    check_shards(store, read_index(store), "train")
    assert (data / gone).exists()


# ---------------------------------------------------------------------------------------------- promote


def test_promote_refuses_a_damaged_candidate_and_champion_with_the_same_error(tmp_path, shards):
    from m3i.artifacts import DamagedArtifactError
    from m3i.promote import ChampionDamaged, PromoteError, promote
    from tests.promote_helpers import make_export, metrics_doc, promote_cfg, write_metrics

    models = str(tmp_path / "models")
    first, second = make_export(tmp_path, models, "m", 1), make_export(tmp_path, models, "m", 2)
    ds = str(shards)

    def scores(r, probe):
        return write_metrics(str(tmp_path / f"eval-{r.version}"), metrics_doc(r.uri, ds, probe, 0.5))

    assert promote(promote_cfg(), first.uri, scores(first, 0.5)).promoted
    weights = Path(second.uri) / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(DamagedArtifactError, match=r"the candidate v00000002-\w+ is damaged: .*model.safetensors has \d+ bytes"):
        promote(promote_cfg(), second.uri, scores(second, 0.9))
    weights.write_bytes(intact)
    champion = Path(first.uri) / "model.safetensors"
    champion.write_bytes(champion.read_bytes()[:100])
    with pytest.raises(ChampionDamaged, match=r"the champion of model 'm', v00000001-\w+, is damaged") as e:
        promote(promote_cfg(), second.uri, scores(second, 0.9))
    assert isinstance(e.value, DamagedArtifactError) and isinstance(e.value, PromoteError)
