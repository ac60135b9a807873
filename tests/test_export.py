"""`m3i export`: ZeRO 1/2/3 and bf16 checkpoints -> the engine's exact backbone weights, plain-timm loading
in a fresh process, model card and hashes, S3, bad values.

The trained checkpoints come from ONE 2-process torchrun of this file as a script (``python -m
torch.distributed.run -m tests.test_export ...``): it trains each case in turn and, at the
checkpoint, dumps the engine's module state gathered across ranks (``GatheredParameters`` under
ZeRO-3) as the reference the export must reproduce bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import shard_small, small_demo, train_env, write_train_config

CASES = ("1-fp32", "2-fp32", "3-fp32", "0-bf16", "2-bf16", "3-bf16")
"""``<zero stage>-<precision>`` of the trained runs."""

REFERENCE = "reference-module.pt"


# ---------------------------------------------------------------------------------------------- helpers


def _cfg(tmp: Path, shards: str = "unused", output: str = "unused", **sections):
    from m3i.config import load_config

    return load_config(None, write_train_config(tmp / "cfg.yaml", shards, output, **sections))


def _export(tmp: Path, checkpoint: str, out: str, **export):
    from m3i.export import export as run

    overrides = [f"export.checkpoint={checkpoint}", f"export.out={out}", *(f"export.{k}={v}" for k, v in export.items())]
    from m3i.config import load_config

    return run(load_config(None, write_train_config(tmp / "export.yaml", "unused", "unused"), overrides))


def _weights(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(uri)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_zero0_checkpoint(output: Path, cfg, model, step: int, meta_extra: dict | None = None) -> Path:
    """A checkpoint laid out as DeepSpeed's ZeRO-0 fp32 save (module state in ``mp_rank_00_model_states.pt``)."""
    from m3i.config import to_dict

    tag = output / "checkpoints" / f"step-{step:08d}"
    (tag / "ds").mkdir(parents=True)
    meta = {"m3i_version": "0.1.0", "run_id": "fake run/1", "config": to_dict(cfg), "num_classes": model.num_classes,
            "data_index_sha256": "a" * 64, "inputs_sha256": "b" * 64, **(meta_extra or {})}
    state = {"module": model.state_dict(), "buffer_names": ["ema_m"], "optimizer": None, "param_shapes": None,
             "frozen_param_shapes": None, "frozen_param_fragments": None, "step": step, "ema": {"master": None}, "meta": meta}
    torch.save(state, tag / "ds" / "mp_rank_00_model_states.pt")
    files = [{"key": "ds/mp_rank_00_model_states.pt", "bytes": (tag / "ds" / "mp_rank_00_model_states.pt").stat().st_size}]
    (tag / "complete.json").write_text(json.dumps({"step": step, "world_size": 1, "files": files, **meta}))
    return tag


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A tiny M3I model whose EMA target differs from its online encoder, saved as a ZeRO-0 checkpoint."""
    from m3i.models import build_model

    root = tmp_path_factory.mktemp("fake")
    cfg = _cfg(root)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tag = _fake_zero0_checkpoint(root / "run", cfg, model, step=3)
    return {"root": root, "cfg": cfg, "model": model.eval(), "run": str(root / "run"), "tag": str(tag)}


# ---------------------------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize(
    "key, value, field",
    [("weights", "target", "export.weights"), ("dtype", "fp16", "export.dtype"), ("name", "a/b", "export.name"), ("out", "", "export.out")],
)
def test_bad_export_values_raise_value_error_naming_the_field(key, value, field):
    from m3i.config import load_config

    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, None, [f"export.{key}={value}"])


def test_bad_value_on_the_command_line_exits_2(capsys):
    from m3i.cli import main

    assert main(["export", "--set", "export.weights=teacher"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "m3i export: error: export.weights='teacher' is not allowed; choose one of ['online', 'ema']"


def test_streamed_safetensors_equal_the_library_and_reject_a_wrong_tensor(tmp_path):
    from safetensors import safe_open

    from m3i.export import write_safetensors

    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.int64), "d": torch.randn(2, 2).to(torch.bfloat16)}
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    path = tmp_path / "x.safetensors"
    size = write_safetensors(path, specs, iter(tensors.items()), metadata={"format": "pt"})
    assert size == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    wrong = iter([("a", tensors["a"]), ("b.c", tensors["b.c"].float())])
    with pytest.raises(ValueError, match="expected 'b.c'"):
        write_safetensors(path, specs, wrong)
    assert not path.exists()


def test_no_complete_checkpoint_is_a_clear_error(tmp_path, fake):
    from m3i.artifacts import locate_checkpoint

    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        locate_checkpoint(str(tmp_path / "empty-run"))
    half = tmp_path / "run" / "checkpoints" / "step-00000004"
    (half / "ds").mkdir(parents=True)  # a save that never completed: no complete.json
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        locate_checkpoint(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="has no complete.json"):
        locate_checkpoint(str(half))
    from m3i.cli import main

    assert main(["-q", "export", "--checkpoint", str(tmp_path / "empty-run"), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_online_ema_and_bf16_of_a_zero0_layout(tmp_path, fake):
    model = fake["model"]
    online = _export(tmp_path, fake["run"], str(tmp_path / "models"))
    ema = _export(tmp_path, fake["tag"], str(tmp_path / "models"), weights="ema")
    half = _export(tmp_path, fake["run"], str(tmp_path / "models"), dtype="bf16", name="tiny-bf16")
    ref_online = model.backbone.state_dict()
    ref_ema = model.target.backbone.state_dict()
    got_online, got_ema, got_half = _weights(online.weights), _weights(ema.weights), _weights(half.weights)
    assert set(got_online) == set(ref_online) == set(got_ema) and len(got_online) > 50
    assert all(torch.equal(got_online[k], v) for k, v in ref_online.items())
    assert all(torch.equal(got_ema[k], v) for k, v in ref_ema.items())
    assert not all(torch.equal(got_ema[k], got_online[k]) for k in got_online)  # really the other encoder
    assert all(got_half[k].dtype == torch.bfloat16 and torch.equal(got_half[k], v.to(torch.bfloat16)) for k, v in ref_online.items())
    # Name: the run id made path-safe; version: step and the weights' hash.
    assert online.name == "fake-run-1" and online.version == f"v00000003-{online.sha256[:8]}"
    assert Path(online.uri) == tmp_path / "models" / "fake-run-1" / online.version
    assert half.name == "tiny-bf16" and half.bytes < online.bytes * 0.51


def test_timm_loads_the_export_in_a_fresh_process_without_m3i(tmp_path, fake):
    model = fake["model"]
    r = _export(tmp_path, fake["run"], str(tmp_path / "models"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.encode(x)  # [3, D]
    cfg = json.loads(Path(r.config).read_text())
    args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    code = f"""
import json, sys, timm, torch
x = torch.load({str(tmp_path / 'x.pt')!r})
a = timm.create_model("local-dir:{r.uri}", pretrained=True).eval()
b = timm.create_model("{r.timm_architecture}", pretrained=True,
    pretrained_cfg_overlay=dict(file="{r.weights}", num_classes=0), {args}).eval()
with torch.no_grad():
    fa, fb = a(x), b(x)
assert "m3i" not in sys.modules
torch.save({{"a": fa, "b": fb}}, {str(tmp_path / 'y.pt')!r})
print(json.dumps(timm.data.resolve_data_config({{}}, model=a)))
"""
    env = train_env()
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = torch.load(tmp_path / "y.pt")
    assert out["a"].shape == expected.shape == (3, model.backbone.num_features)
    torch.testing.assert_close(out["a"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["a"], out["b"])
    data = json.loads(p.stdout.strip().splitlines()[-1])
    assert data["input_size"] == [3, 32, 32] and data["mean"] == [0.485, 0.456, 0.406] and data["std"] == [0.229, 0.224, 0.225]
    assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic"
    card = Path(r.card).read_text()
    assert 'timm.create_model("local-dir:' in card and "pretrained_cfg_overlay=dict(file=" in card


def _card_code(card: str) -> list[str]:
    """The model card's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_the_demo_export_names_its_network_and_its_cards_snippets_load_it_in_plain_timm(tmp_path):
    """Issue #13: the demo preset's 96-wide, 4-block, patch-8, 32 px ViT is not called vit_tiny_patch16_224;
    both snippets of its card, run as written in a fresh process without m3i, give the model's features."""
    from PIL import Image

    from m3i.config import load_config
    from m3i.models import build_model

    cfg = load_config("demo")
    assert (cfg.model.backbone, cfg.model.patch_size, cfg.data.image_size) == ("m3i_vit_micro", 8, 32)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=6)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    _fake_zero0_checkpoint(tmp_path / "run", cfg, model, step=5)
    r = _export(tmp_path, str(tmp_path / "run"), str(tmp_path / "models"), name="demo")
    folder = Path(r.uri)
    config = json.loads((folder / "config.json").read_text())
    manifest = json.loads((folder / "export.json").read_text())
    card = (folder / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| architecture |"))
    for named in (r.architecture, config["m3i_architecture"], manifest["architecture"], row):
        assert "vit_w96_d4_h3_p8_32" in named and "patch16" not in named and "224" not in named, named
    assert next(iter(config)) == "m3i_architecture"  # the first thing a reader of config.json sees
    assert config["architecture"] == manifest["timm_architecture"] == "vit_tiny_patch16_224"  # timm's constructor
    assert config["model_args"] == {"embed_dim": 96, "depth": 4, "num_heads": 3, "num_classes": 0, "img_size": 32,
                                    "patch_size": 8, "global_pool": "max"}
    assert "`vit_w96_d4_h3_p8_32`, a timm VisionTransformer built as timm's `vit_tiny_patch16_224` with the arguments below" in card

    by_folder, by_file = _card_code(card)
    Image.new("RGB", (40, 48), (200, 30, 90)).save(tmp_path / "image.png")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    here = f"/path/to/demo/{r.version}"
    assert here in by_folder and here in by_file
    code = "\n".join([
        "import sys, torch",
        "from PIL import Image",
        f"image = Image.open({str(tmp_path / 'image.png')!r}).convert('RGB')",
        f"x = torch.load({str(tmp_path / 'x.pt')!r})",
        by_folder.replace(here, r.uri),  # as printed, but for the folder
        "with torch.no_grad():",
        "    out = {'card': features.detach(), 'folder': model(x)}",
        by_file.replace(here, r.uri),
        "with torch.no_grad():",
        "    out['file'] = model(x)",
        "assert 'm3i' not in sys.modules",
        f"torch.save(out, {str(tmp_path / 'y.pt')!r})",
    ])
    env = train_env()
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, code + "\n" + p.stderr[-3000:]
    out = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        expected = model.eval().encode(x)  # [3, 96]
    assert out["card"].shape == (1, 96) and torch.isfinite(out["card"]).all()
    torch.testing.assert_close(out["folder"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["folder"], out["file"])


def test_model_card_manifest_and_sums_are_true(tmp_path, fake):
    scores = tmp_path / "evals" / "scores.json"
    scores.parent.mkdir()
    scores.write_text(json.dumps({"knn": {"top1": 0.4321}, "linear_probe": {"top1": 0.5}, "split": "eval"}))
    r = _export(tmp_path, fake["run"], str(tmp_path / "models"), metrics=str(scores))
    folder = Path(r.uri)
    card = (folder / "README.md").read_text()
    for fact in ("**online** encoder in **fp32**", "| training steps | 3 (of 6 planned), world size 1, 24 samples seen |", "a" * 64, "b" * 64,
                 "`fake run/1`", "`vit_tiny_patch16_224`", "| knn.top1 | 0.4321 |", "| linear_probe.top1 | 0.5000 |",
                 f"`{r.sha256}`", "backbone: m3i_vit_micro", "module state (float32)"):
        assert fact in card, fact
    assert "Not yet evaluated" not in card
    sums = dict(reversed(line.split("  ")) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"model.safetensors", "config.json", "README.md"}
    assert all(_sha(folder / k) == v for k, v in sums.items())
    manifest = json.loads((folder / "export.json").read_text())
    assert {f["key"] for f in manifest["files"]} == {"model.safetensors", "config.json", "README.md", "SHA256SUMS"}
    assert all(_sha(folder / f["key"]) == f["sha256"] and (folder / f["key"]).stat().st_size == f["bytes"] for f in manifest["files"])
    assert manifest["step"] == 3 and manifest["encoder"] == "online" and manifest["evaluation"]["knn"]["top1"] == 0.4321
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0 and config["num_features"] == 96
    # timm's constructor stays in `architecture` (plain timm needs a timm name); the network is named beside it.
    assert config["m3i_architecture"] == manifest["architecture"] == r.architecture == "vit_w96_d4_h3_p8_32"
    assert manifest["timm_architecture"] == r.timm_architecture == "vit_tiny_patch16_224" and manifest["format_version"] == 2
    assert "| architecture | `vit_w96_d4_h3_p8_32`, " in card and "| timm constructor | `vit_tiny_patch16_224` with the model args below |" in card
    assert config["model_args"] == {"embed_dim": 96, "depth": 4, "num_heads": 3, "num_classes": 0, "img_size": 32, "patch_size": 8, "global_pool": "avg"}
    plain = _export(tmp_path, fake["run"], str(tmp_path / "models2"))
    assert "Not yet evaluated." in Path(plain.card).read_text()
    scores.write_text("[0.5]")
    with pytest.raises(ValueError, match="export.metrics=.* is a JSON list"):
        _export(tmp_path, fake["run"], str(tmp_path / "models3"), metrics=str(scores))
    assert not (tmp_path / "models3").exists()


def test_the_export_carries_the_runs_history_up_to_its_step(tmp_path, fake):
    from m3i.artifacts import read_history
    from m3i.train.history import History

    run = tmp_path / "run"
    _fake_zero0_checkpoint(run, fake["cfg"], fake["model"], step=3, meta_extra={"init_from": {
        "uri": "s3://models/base/v1", "kind": "exported", "name": "base", "step": 9, "modules": ["backbone", "target.backbone"]}})
    history = History(str(run))
    for s in range(1, 6):  # steps 4 and 5 were trained after the exported checkpoint
        history.append({"step": s, "time": 1.7e9 + s, "lr": 1e-4, "loss": 3.0 - s / 10, "loss_img": 0.5})
    history.flush()
    for where in (str(run), str(run / "checkpoints" / "step-00000003")):
        r = _export(tmp_path, where, str(tmp_path / "models"))
        folder = Path(r.uri)
        assert r.history == str(folder / "history.jsonl")
        rows = read_history(str(folder))
        assert [row["step"] for row in rows] == [1, 2, 3] and rows == read_history(str(run))[:3]
        sums = dict(reversed(line.split("  ")) for line in (folder / "SHA256SUMS").read_text().splitlines())
        assert set(sums) == {"model.safetensors", "config.json", "README.md", "history.jsonl"}
        assert sums["history.jsonl"] == _sha(folder / "history.jsonl")
        manifest = json.loads((folder / "export.json").read_text())
        entry = next(f for f in manifest["files"] if f["key"] == "history.jsonl")
        assert entry == {"key": "history.jsonl", "bytes": (folder / "history.jsonl").stat().st_size, "sha256": sums["history.jsonl"]}
        assert manifest["history_steps"] == 3 and manifest["init_from"]["uri"] == "s3://models/base/v1"
        card = (folder / "README.md").read_text()
        assert "`history.jsonl` (the training curves" in card and "3 rows" in card
        assert "| initialised from | `backbone`, `target.backbone` from `s3://models/base/v1` (exported `base`, step 9) |" in card
    # A run without a history exports without one.
    assert _export(tmp_path, fake["run"], str(tmp_path / "plain")).history is None


def test_ema_of_a_run_without_the_image_branch_is_refused(tmp_path):
    from m3i.models import build_model

    cfg = _cfg(tmp_path, objective={"use_img": False})
    _fake_zero0_checkpoint(tmp_path / "run", cfg, build_model(cfg, num_classes=4), step=1)
    with pytest.raises(ValueError, match="no EMA target"):
        _export(tmp_path, str(tmp_path / "run"), str(tmp_path / "m"), weights="ema")
    assert _export(tmp_path, str(tmp_path / "run"), str(tmp_path / "m")).step == 1


def test_a_checkpoint_that_does_not_match_its_architecture_is_refused(tmp_path, fake):
    from m3i.models import build_model

    cfg = _cfg(tmp_path)
    model = build_model(cfg, num_classes=4)
    wrong = _cfg(tmp_path, model={"patch_size": 4})  # the manifest says patch 4, the weights are patch 8
    _fake_zero0_checkpoint(tmp_path / "run", wrong, model, step=1)
    with pytest.raises(ValueError, match=r"does not match vit_w96_d4_h3_p4_32 \(timm vit_tiny_patch16_224 with .*'patch_size': 4"):
        _export(tmp_path, str(tmp_path / "run"), str(tmp_path / "m"))


# ---------------------------------------------------------------------------------------------- trained runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """2-step, 2-process runs of every case in CASES, each with the gathered engine module beside it."""
    root = tmp_path_factory.mktemp("export-runs")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.test_export", str(root / "shards"), str(root), *CASES]
    p = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return {case: root / f"run-{case}" for case in CASES}


def _reference(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / REFERENCE, weights_only=True)


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["1-fp32", "2-fp32", "3-fp32"])
def test_zero_stages_export_the_engines_exact_fp32_weights(runs, tmp_path, case):
    ref = _reference(runs[case])
    online = _weights(_export(tmp_path, str(runs[case]), str(tmp_path / "m")).weights)
    ema = _weights(_export(tmp_path, str(runs[case]), str(tmp_path / "m"), weights="ema").weights)
    for got, prefix in ((online, "backbone."), (ema, "target.backbone.")):
        want = _strip(ref, prefix)
        assert set(got) == set(want) and len(got) > 50
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{prefix}: {bad[:5]} differ"
        assert all(v.dtype == torch.float32 for v in got.values())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["0-bf16", "2-bf16", "3-bf16"])
def test_bf16_runs_export_their_fp32_master_weights(runs, tmp_path, case):
    """The fp32 export carries the master copies (optimizer's and EMA's); rounded to bf16 they are the engine's module."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = runs[case]
    ref = _reference(run)
    online = _weights(_export(tmp_path, str(run), str(tmp_path / "m")).weights)
    ema = _weights(_export(tmp_path, str(run), str(tmp_path / "m"), weights="ema").weights)
    half = _weights(_export(tmp_path, str(run), str(tmp_path / "m"), dtype="bf16").weights)
    for got, prefix in ((online, "backbone."), (ema, "target.backbone.")):
        want = _strip(ref, prefix)
        assert all(v.dtype == torch.bfloat16 for v in want.values())
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k].to(torch.bfloat16), want[k]) for k in want)
        assert not all(torch.equal(got[k], got[k].to(torch.bfloat16).float()) for k in got), "no more precise than bf16"
    assert all(torch.equal(half[k], _strip(ref, "backbone.")[k]) for k in half)
    if case != "0-bf16":  # DeepSpeed's own consolidation reads ZeRO-1/2/3 optimizer shards only
        tag = next((run / "checkpoints").glob("step-*"))
        with contextlib.redirect_stdout(io.StringIO()):
            ds = get_fp32_state_dict_from_zero_checkpoint(str(tag), tag="ds")
        assert all(torch.equal(online[k], ds["backbone." + k]) for k in online)


@pytest.mark.slow
def test_export_from_the_command_line_prints_where_everything_went(runs, tmp_path, capsys):
    from m3i.cli import main

    out = tmp_path / "models"
    assert main(["-q", "export", "--checkpoint", str(runs["2-fp32"]), "--out", str(out), "--set", "export.name=zero2"]) == 0
    printed = capsys.readouterr().out
    (folder,) = (out / "zero2").iterdir()
    assert folder.name.startswith("v00000002-")
    for f in ("model.safetensors", "config.json", "README.md", "SHA256SUMS", "export.json"):
        assert (folder / f).is_file() and str(folder / f) in printed
    index = json.loads((runs["2-fp32"].parent / "shards" / "index.json").read_text())
    card = (folder / "README.md").read_text()
    assert f"`{index['plan_sha256']}`" in card and f"`{index['inputs_sha256']}`" in card
    assert "| training steps | 2 (of 2 planned), world size 2, 32 samples seen |" in card
    assert "float32" in card and "zero_stage: 2" in card


@pytest.mark.slow
@pytest.mark.s3
def test_export_from_and_to_s3_gives_the_same_version(runs, tmp_path, s3_bucket):
    from m3i.storage import open_store

    run = runs["1-fp32"]
    local = _export(tmp_path, str(run), str(tmp_path / "m"), name="z1")
    store = open_store(f"{s3_bucket}/runs/z1")
    for path in sorted(run.rglob("*")):
        if path.is_file() and "checkpoints" in path.parts:
            store.put_file(path.relative_to(run).as_posix(), str(path))
    remote = _export(tmp_path, f"{s3_bucket}/runs/z1", f"{s3_bucket}/models", name="z1", staging_dir=str(tmp_path / "staging"))
    assert remote.uri == f"{s3_bucket}/models/z1/{local.version}" and remote.sha256 == local.sha256
    out = open_store(remote.uri)
    assert {o.key for o in out.list()} == {"model.safetensors", "config.json", "README.md", "SHA256SUMS", "export.json"}
    assert out.sha256("model.safetensors") == local.sha256
    same = {"model.safetensors", "config.json"}  # the card names the checkpoint's URI, so it differs
    files = [f for f in out.read_json("export.json")["files"] if f["key"] in same]
    assert files == [f for f in json.loads((Path(local.uri) / "export.json").read_text())["files"] if f["key"] in same]
    assert f"{s3_bucket}/runs/z1/checkpoints/step-00000002" in out.get_bytes("README.md").decode()
    assert not any((tmp_path / "staging").iterdir())  # the downloaded checkpoint files are gone


# ---------------------------------------------------------------------------------------------- the training script


def _train_cases(shards: str, root: str, cases: list[str]) -> None:
    """Under torchrun: train each case for 2 steps; at its checkpoint, save the gathered module state on rank 0."""
    import os

    import deepspeed

    from m3i.config import load_config
    from m3i.train import train
    from m3i.train.checkpoint import Checkpointer
    from m3i.train.dist import init_distributed

    save = Checkpointer.save

    def save_with_reference(self, engine, step, client_state, rank_state):
        seconds = save(self, engine, step, client_state, rank_state)
        zero3 = engine.zero_optimization_stage() == 3
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None, enabled=zero3):
            if self.info.is_main:
                state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                torch.save(state, Path(self.store.uri) / REFERENCE)
        return seconds

    Checkpointer.save = save_with_reference
    info = None
    for case in cases:
        zero, precision = case.split("-")
        out = Path(root) / f"run-{case}"
        train_cfg = {"zero_stage": int(zero), "precision": precision, "steps": 2, "run_id": f"export-{case}"}
        path = Path(root) / f"{case}-rank{os.environ['RANK']}.yaml"  # one file per rank: both write at once
        cfg = load_config(None, write_train_config(path, shards, str(out), train=train_cfg))
        info = info or init_distributed(cfg.train.backend)
        train(cfg, info=info, progress=False)


if __name__ == "__main__":
    _train_cases(sys.argv[1], sys.argv[2], sys.argv[3:])
