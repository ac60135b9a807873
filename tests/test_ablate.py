"""`m3i ablate`: every arm trains and is scored, the report and plot are written, re-runs reuse results."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from m3i import ablate
from m3i.config import load_config
from tests.helpers import TINY_TRAIN, shard_small, small_demo, write_train_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    shards = str(root / "shards")
    shard_small(small_demo(root / "raw"), shards)
    cfg = write_train_config(
        root / "c.yaml", shards, str(root / "unused"), train={"warmup_steps": 0}, data={"num_workers": 0},
        evaluate={"probe_epochs": 10},
    )
    return root, cfg


def _args(root, cfg, *extra: str) -> list[str]:
    return [
        "-q", "ablate", "--config", str(cfg), "--steps", "4", "--workdir", str(root / "work"), "--doc", str(root / "docs" / "ablation.md"),
        *extra,
    ]


@pytest.mark.slow
def test_ablation_runs_every_arm_and_writes_the_report(setup, monkeypatch):
    from m3i.cli import main

    root, cfg = setup
    assert main(_args(root, cfg, "--seeds", "0", "1")) == 0
    results = json.loads((root / "work" / "results.json").read_text())
    (runs,) = results.values()
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted((v, s) for v in ablate.VARIANTS for s in (0, 1))
    assert all(0 <= r["knn_top1"] <= 1 and 0 <= r["probe_top1"] <= 1 for r in runs)
    assert {"stage1_loss_img", "stage2_loss_cls"} <= set(next(r for r in runs if r["variant"] == "two_stage")["losses"])
    doc = (root / "docs" / "ablation.md").read_text()
    for v in ablate.VARIANTS:
        assert f"(`{v}`)" in doc
    assert "m3i ablate" in doc and "± " in doc and "## Verdict" in doc
    with Image.open(root / "docs" / "ablation.png") as img:
        assert img.format == "PNG"

    # A re-run with the same settings trains nothing and keeps the hand-written notes.
    (root / "docs" / "ablation.md").write_text(doc + "\n## Notes\n\nWhat we tried.\n")
    monkeypatch.setattr(ablate, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main(_args(root, cfg, "--seeds", "0", "1")) == 0
    assert (root / "docs" / "ablation.md").read_text().rstrip().endswith("## Notes\n\nWhat we tried.")


@pytest.mark.slow
def test_two_stage_starts_stage_two_from_the_stage_one_backbone(setup, monkeypatch):
    _, path = setup
    cfg = load_config(None, path)
    calls = []
    real = ablate.train_run

    def spy(stage_cfg, init_backbone=None):
        model, losses = real(stage_cfg, init_backbone)
        calls.append((stage_cfg, init_backbone, {k: v.clone() for k, v in model.backbone.state_dict().items()}))
        return model, losses

    monkeypatch.setattr(ablate, "train_run", spy)
    result = ablate.run_one(cfg, "two_stage", seed=3, steps=5)
    (c1, init1, end1), (c2, init2, _) = calls
    assert init1 is None and (c1.train.steps, c2.train.steps) == (2, 3)
    assert (c1.objective.use_img, c1.objective.use_cls, c1.objective.use_txt) == (True, False, False)
    assert (c2.objective.use_img, c2.objective.use_cls, c2.objective.use_txt) == (False, True, False)
    assert c2.data.sources == ("labelled",) and c1.data.seed == c2.data.seed == 3
    assert init2.keys() == end1.keys() and all(torch.equal(init2[k], end1[k]) for k in end1)
    assert result["variant"] == "two_stage" and result["steps"] == 5


def test_bad_arguments_are_value_errors(setup, tmp_path):
    _, path = setup
    cfg = load_config(None, path)
    with pytest.raises(ValueError, match="variant 'mae'"):
        ablate.run_ablation(cfg, variants=["mae"], seeds=[0], steps=10, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="train.warmup_steps=5"):
        ablate.run_ablation(load_config(None, path, ["train.warmup_steps=5"]), variants=["m3i"], seeds=[0], steps=10, workdir=str(tmp_path))


def _fake(variant: str, seed: int, knn: float, probe: float) -> dict:
    return {"variant": variant, "seed": seed, "steps": 10, "knn_top1": knn, "probe_top1": probe, "knn_top5": 0.9,
            "probe_top5": 0.9, "feature_std": 0.5, "losses": {}, "train_seconds": 1.0, "eval_seconds": 1.0,
            "started_unix": 100.0 + seed, "finished_unix": 102.0 + seed}


def test_verdict_says_when_m3i_does_not_win():
    cfg = load_config(None, overrides=[f"{k}.{kk}={vv}" for k, v in TINY_TRAIN.items() for kk, vv in v.items() if k in ("model",)])
    results = [_fake("m3i", s, 0.30 + 0.01 * s, 0.40) for s in range(3)] + [_fake("cls", s, 0.50, 0.35 + 0.01 * s) for s in range(3)]
    results.append(_fake("img", 0, 0.31, 0.30))
    results.append(_fake("img", 1, 0.29, 0.32))
    doc = ablate.render_markdown(
        results, cfg, variants=["m3i", "cls", "img"], seeds=[0, 1, 2], steps=10, command="m3i ablate", num_classes=8,
        png_name="ablation.png",
    )
    assert "| M3I (all three) (`m3i`) | 31.0 ± 1.0 | 40.0 ± 0.0 |" in doc
    assert "kNN: M3I does **not** win: `cls` is best, M3I is 19.0 points behind; t = -32.91" in doc
    assert "linear probe: M3I has the best mean, 4.0 points above the best other arm `cls`; t = 6.93" in doc
    assert "a clear difference at the two-sided 5 % level (|t| > 2.78)" in doc
    # M3I against an arm of 2 seeds with the same mean: no clear difference
    doc = ablate.render_markdown(
        [r for r in results if r["variant"] != "cls"], cfg, variants=["m3i", "img"], seeds=[0, 1, 2], steps=10,
        command="m3i ablate", num_classes=8, png_name="ablation.png",
    )
    assert "kNN: M3I has the best mean, 1.0 points above the best other arm `img`" in doc
    assert "not a clear difference at the two-sided 5 % level (|t| > 3.18)" in doc


def test_results_of_other_settings_in_the_same_workdir_are_kept(tmp_path):
    path = tmp_path / "results.json"
    ablate._save_result(path, "a", _fake("m3i", 0, 0.2, 0.2))
    ablate._save_result(path, "b", _fake("cls", 0, 0.3, 0.3))  # another ablation, e.g. run at the same time
    assert [r["variant"] for r in ablate._save_result(path, "a", _fake("m3i", 1, 0.2, 0.2))] == ["m3i", "m3i"]
    assert set(json.loads(path.read_text())) == {"a", "b"}
