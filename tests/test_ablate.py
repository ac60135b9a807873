"""The ablation (experiments/ablation, `python -m experiments.ablation` or `m3i ablate`): arms run through `m3i train`,
every checkpoint is scored per attribute, the report and curves are written, re-runs skip finished arms; the verdict's
arithmetic on hand-made numbers; `m3i ablate` hands its arguments to the experiment of the checkout."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

import experiments.ablation.run as ablation_run
from experiments.ablation import arms, report, stats
from experiments.ablation.attributes import ATTRIBUTES_FILE, build_attribute_sets, read_attributes
from m3i.config import ShardConfig, load_config

# A model and images small enough for a few-second `m3i train` on one CPU thread.
TINY = {
    "data": {"image_size": 16, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 4},
    "model": {
        "backbone": "m3i_vit_micro", "patch_size": 8, "embed_dim": 16, "proj_dim": 16, "projector_depth": 0,
        "predictor_depth": 1, "predictor_heads": 2, "text_encoder": "byte", "text_width": 16, "text_depth": 1,
        "text_heads": 2, "text_max_len": 48,
    },
    "train": {"warmup_steps": 0, "log_every": 1},
    "shard": {"workers": 1, "max_samples_per_shard": 16},
    "evaluate": {"probe_epochs": 5, "k": 5},
}
COUNTS = {"labelled": 16, "captioned": 8, "unlabelled": 8, "eval": 8}
VALUES = {"shape": ("circle", "square"), "colour": ("red", "blue"), "size": ("small", "large"), "position": ("left", "right")}
RGB = {"red": (220, 40, 40), "blue": (40, 60, 220)}


def write_demo_root(root: Path) -> Path:
    """A demo-like root: the four sources as `m3i demo-data` lays them out, and attributes.jsonl (2 values each)."""
    rows, captions = [], []
    for source, n in COUNTS.items():
        for i in range(n):
            rng = random.Random(f"{source}/{i}")
            a = {k: v[rng.randrange(2)] for k, v in VALUES.items()}
            a["shape"] = VALUES["shape"][i % 2]  # labelled and eval: both classes in every split
            img = Image.new("RGB", (16, 16), (235, 235, 235))
            r = 3 if a["size"] == "small" else 6
            cx = 5 if a["position"] == "left" else 11
            box = (cx - r, 8 - r, cx + r, 8 + r)
            draw = ImageDraw.Draw(img)
            (draw.ellipse if a["shape"] == "circle" else draw.rectangle)(box, fill=RGB[a["colour"]])
            rel = f"{source}/{a['shape']}/{i:06d}.png" if source in ("labelled", "eval") else f"{source}/{i:06d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / rel)
            rows.append({"image": rel, "source": source, **a})
            if source == "captioned":
                captions.append({"image": rel, "caption": f"a {a['size']} {a['colour']} thing on the {a['position']}"})
    (root / ATTRIBUTES_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ablate")
    root = write_demo_root(base / "raw")
    cfg = base / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return base, root, cfg


def _args(base, root, cfg, *extra: str) -> list[str]:
    return [
        "-q", "--config", str(cfg), "--demo-root", str(root), "--steps", "4", "--curve-every", "2", "--seeds", "0",
        "--variants", "m3i", "two_stage", "--attributes", "shape", "colour", "--workdir", str(base / "work"),
        "--doc", str(base / "docs" / "ablation.md"), *extra,
    ]


@pytest.mark.slow
def test_ablation_trains_every_arm_through_m3i_train_and_scores_its_curve(setup, monkeypatch):
    from experiments.ablation.cli import main
    from m3i.artifacts import find_latest

    base, root, cfg = setup
    assert main(_args(base, root, cfg)) == 0
    results = json.loads((base / "work" / "results.json").read_text())
    ((key, runs),) = results.items()
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("m3i", 0), (arms.RANDOM, 0), ("two_stage", 0)]
    by = {r["variant"]: r for r in runs}
    for v in ("m3i", "two_stage"):
        assert set(by[v]["curve"]) == {"shape", "colour"}
        for points in by[v]["curve"].values():
            assert [p["step"] for p in points] == [0, 2, 4]
            assert all(0 <= p["knn_top1"] <= 1 and 0 <= p["probe_top1"] <= 1 for p in points)
        # step 0 is the seed's random init, the same for every arm
        assert by[v]["curve"]["shape"][0] == by[arms.RANDOM]["curve"]["shape"][0]
    run = base / "work" / "runs" / key
    assert by["m3i"]["outputs"] == [str(run / "m3i-s0")] and find_latest(str(run / "m3i-s0")).step == 4
    stage1, stage2 = (run / "two_stage-s0" / f"stage{i}" for i in (1, 2))
    assert by["two_stage"]["stage_steps"] == [2, 2] and find_latest(str(stage1)).step == 2
    s2 = find_latest(str(stage2))
    assert s2.step == 2 and s2.manifest["init_from"]["uri"].startswith(str(stage1))
    s2cfg = s2.manifest["config"]
    assert (s2cfg["objective"]["use_img"], s2cfg["objective"]["use_cls"], s2cfg["objective"]["use_txt"]) == (False, True, True)
    assert s2cfg["data"]["sources"] == ["labelled", "captioned"] and s2cfg["train"]["seed"] == s2cfg["data"]["seed"] == 0
    assert {"stage1_loss_img", "stage2_loss_cls", "stage2_loss_txt"} <= set(by["two_stage"]["losses"])
    assert "m3i train" in (run / "m3i-s0" / "train.log").read_text()

    doc = (base / "docs" / "ablation.md").read_text()
    for heading in ("### shape (chance 50.0 %)", "### colour (chance 50.0 %)", "## Verdict (computed)"):
        assert heading in doc
    assert "| random init (step 0) |" in doc and "| M3I (all three) (`m3i`) |" in doc and "(`two_stage`)" in doc
    assert "- **shape**, linear probe: M3I" in doc and "t n/a with one seed" in doc
    assert "![linear-probe top-1 against step, one panel per attribute, mean over seeds](ablation_curves.png)" in doc
    with Image.open(base / "docs" / "ablation_curves.png") as img:
        assert img.format == "PNG" and img.height > 300

    # A re-run with the same settings trains and scores nothing and keeps the hand-written notes.
    (base / "docs" / "ablation.md").write_text(doc + "\n## Notes\n\nWhat we tried.\n")
    monkeypatch.setattr(ablation_run, "run_arm", lambda job: pytest.fail(f"finished arm {job.variant} was run again"))
    assert main(_args(base, root, cfg)) == 0
    assert (base / "docs" / "ablation.md").read_text().rstrip().endswith("## Notes\n\nWhat we tried.")
    monkeypatch.undo()

    # Complete checkpoints without a results entry: scored again, not trained again.
    results[key] = [r for r in runs if r["variant"] != "m3i"]
    (base / "work" / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(arms, "_train", lambda *a: pytest.fail("an arm with a complete final checkpoint was trained again"))
    assert main(_args(base, root, cfg)) == 0
    rescored = {r["variant"]: r for r in json.loads((base / "work" / "results.json").read_text())[key]}["m3i"]
    assert rescored["trained_stages"] == [] and rescored["curve"] == by["m3i"]["curve"]


def test_stages_become_m3i_train_overrides():
    assert arms.stage_steps("two_stage", 5) == [2, 3] and arms.stage_steps("m3i", 5) == [5]
    s1, s2 = arms.VARIANTS["two_stage"].stages
    over = arms.stage_overrides(s2, seed=3, steps=3, output="/w/two_stage-s3/stage2", curve_every=2, init_from="/w/two_stage-s3/stage1")
    cfg = load_config("demo", overrides=over)
    assert (cfg.objective.use_img, cfg.objective.use_cls, cfg.objective.use_txt) == (False, True, True)
    assert cfg.data.sources == ("labelled", "captioned") and cfg.data.seed == cfg.train.seed == 3
    assert cfg.train.init_from == "/w/two_stage-s3/stage1" and cfg.train.steps == 3 and cfg.train.output == "/w/two_stage-s3/stage2"
    assert cfg.checkpoint.interval_steps == 2 and cfg.checkpoint.keep_last >= 2
    cfg = load_config("demo", overrides=["train.init_from=elsewhere", *arms.stage_overrides(s1, seed=0, steps=2, output="o", curve_every=1)])
    assert cfg.train.init_from == "" and (cfg.objective.use_img, cfg.objective.use_cls) == (True, False)
    assert cfg.data.sources == ("labelled", "captioned", "unlabelled")


def test_attribute_sets_relabel_the_labelled_and_eval_images(setup):
    from m3i.evaluate import read_split_index

    base, root, _ = setup
    out = base / "attr-test"
    sets = build_attribute_sets(root, out, ["colour", "position"], ShardConfig(workers=1))
    rows = read_attributes(root)
    for a in ("colour", "position"):
        index = read_split_index(sets[a])
        assert index.classes == sorted({r[a] for r in rows if r["source"] in ("labelled", "eval")})
        assert index.raw["splits"]["train"]["sources"] == {"labelled": COUNTS["labelled"]}
        assert index.raw["splits"]["eval"]["sources"] == {"labelled": COUNTS["eval"]}
    links = sorted((out / "colour" / "images" / "eval").rglob("*.png"))
    # Hard links to the demo images (not symlinks, which m3i shard refuses when they lead out of the tree).
    assert len(links) == COUNTS["eval"] and all(not p.is_symlink() and p.stat().st_nlink >= 2 for p in links)
    with pytest.raises(ValueError, match="attribute 'texture' is missing"):
        build_attribute_sets(root, out, ["texture"], ShardConfig(workers=1))


def test_bad_arguments_are_value_errors(setup, tmp_path):
    base, root, path = setup
    cfg = load_config("demo", path)
    kw = dict(demo_root=str(root), seeds=[0], steps=10, curve_every=5, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="variant 'mae'"):
        ablation_run.run_ablation(cfg, variants=["mae"], **kw)
    with pytest.raises(ValueError, match="train.warmup_steps=5"):
        ablation_run.run_ablation(load_config("demo", path, ["train.warmup_steps=5"]), variants=["two_stage"], **kw)
    with pytest.raises(ValueError, match="has no labelled; write the demo data"):
        ablation_run.run_ablation(cfg, variants=["m3i"], **{**kw, "demo_root": str(tmp_path)})
    with pytest.raises(ValueError, match="has no attributes.jsonl"):
        read_attributes(tmp_path)


def test_verdict_arithmetic_on_hand_made_numbers():
    img, cls, txt = [20.0, 21.0, 22.0], [40.0, 41.0, 42.0], [31.0, 31.0]
    c_img, c_cls, c_txt = stats.compare([30.0, 31.0, 32.0], {"img": img, "cls": cls, "txt": txt})
    assert (c_img.rival, c_img.diff, c_img.crit) == ("img", 10.0, 2.78)
    assert c_img.t == pytest.approx(10 / math.sqrt(2 / 3)) and c_img.reached and c_img.clear
    assert c_cls.diff == -10.0 and not c_cls.reached and c_cls.clear
    # equal means, against 2 seeds without spread: t = 0, 3 degrees of freedom
    assert (c_txt.diff, c_txt.t, c_txt.crit, c_txt.reached, c_txt.clear) == (0.0, 0.0, 3.18, True, False)
    line = stats.verdict_line("shape", "kNN", [c_img, c_cls, c_txt])
    assert line.startswith("- **shape**, kNN: M3I does **not** reach `cls`. Against `img` +10.0 points (t = 12.25, a clear")
    assert "`cls` -10.0 points (t = -12.25, a clear difference (|t| > 2.78))" in line
    assert "`txt` +0.0 points (t = 0.00, not a clear difference (|t| > 3.18))" in line
    (only,) = stats.compare([30.0], {"two_stage": [29.0]})
    assert only.t is None and only.reached and not only.clear
    assert stats.verdict_line("colour", "linear probe", [only]) == (
        "- **colour**, linear probe: M3I reaches every other arm. Against `two_stage` +1.0 points (t n/a with one seed)."
    )


def _entry(variant: str, seed: int, probe: list[float], knn: float = 0.5) -> dict:
    steps = [0, 2, 4][-len(probe):] if variant != arms.RANDOM else [0]
    curve = [{"step": s, "knn_top1": knn, "probe_top1": p, "feature_std": 0.5, "classes": 2} for s, p in zip(steps, probe)]
    return {"variant": variant, "seed": seed, "steps": 4, "curve": {"shape": curve}, "train_seconds": 1.0, "eval_seconds": 1.0,
            "started_unix": 100.0 + seed, "finished_unix": 160.0 + seed}


def test_report_tables_and_curves_from_hand_made_results():
    results = [_entry(arms.RANDOM, s, [0.5]) for s in (0, 1)]
    results += [_entry("m3i", s, [0.5, 0.6, 0.70 + 0.02 * s]) for s in (0, 1)]
    results += [_entry("cls", s, [0.5, 0.7, 0.80 + 0.02 * s], knn=0.4) for s in (0, 1)]
    ab = ablation_run.Ablation(results, "abc123", load_config("demo"), {"shape": ["circle", "square"]}, {"labelled": 16})
    doc = report.render_markdown(
        ab, variants=["m3i", "cls"], seeds=[0, 1], steps=4, curve_every=2, attributes=["shape"], command="m3i ablate",
        png_name="ablation_curves.png",
    )
    assert "| random init (step 0) | 50.0 ± 0.0 | 50.0 ± 0.0 | 0.500 | 50.0, 50.0 |" in doc
    assert "| M3I (all three) (`m3i`) | 50.0 ± 0.0 | 71.0 ± 1.4 | 0.500 | 70.0, 72.0 |" in doc
    assert "- **shape**, linear probe: M3I does **not** reach `cls`. Against `cls` -10.0 points (t = -7.07" in doc
    assert "- **shape**, kNN: M3I reaches every other arm. Against `cls` +10.0 points (t = inf, a clear" in doc
    curves = stats.mean_curves(results, ["m3i", "cls"], "shape")
    assert curves["m3i"] == ([0, 2, 4], [50.0, 60.0, pytest.approx(71.0)])
    png = report.curves_png({"shape": curves, "colour": curves}, {"shape": 50.0, "colour": 50.0}, title="t")
    import io

    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size[0] == 760


def test_results_of_other_settings_in_the_same_workdir_are_kept(tmp_path):
    path = tmp_path / "results.json"
    ablation_run._save_result(path, "a", _entry("m3i", 0, [0.2]))
    ablation_run._save_result(path, "b", _entry("cls", 0, [0.3]))  # another ablation, e.g. run at the same time
    assert [r["variant"] for r in ablation_run._save_result(path, "a", _entry("m3i", 1, [0.2]))] == ["m3i", "m3i"]
    # the same arm and seed again (re-scored) replaces its entry
    runs = ablation_run._save_result(path, "a", _entry("m3i", 0, [0.9]))
    assert sorted((r["seed"], r["curve"]["shape"][-1]["probe_top1"]) for r in runs) == [(0, 0.9), (1, 0.2)]
    assert set(json.loads(path.read_text())) == {"a", "b"}


def test_m3i_ablate_hands_its_arguments_to_the_experiment(tmp_path, capfd):
    from m3i.cli import main

    assert main(["ablate", "--help"]) == 0
    out = capfd.readouterr().out
    assert "usage: python -m experiments.ablation" in out and "--demo-root DIR" in out and "--curve-every" in out
    # The experiment's own checks answer, and its exit status is m3i's.
    assert main(["-q", "ablate", "--demo-root", str(tmp_path), "--steps", "1", "--seeds", "0"]) == 2
    err = capfd.readouterr().err
    assert "python -m experiments.ablation: error: steps=1" in err and "need steps >= 2" in err


def test_m3i_ablate_without_a_checkout_says_how_to_run_the_experiment(tmp_path, monkeypatch, capsys):
    """An installed wheel carries no experiments/: the command names the checkout's entry instead of failing on an import."""
    import m3i
    from m3i.cli import main

    monkeypatch.setattr(m3i, "__file__", str(tmp_path / "site-packages" / "m3i" / "__init__.py"))
    assert main(["ablate", "--demo-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "m3i ablate: error: m3i ablate runs experiments/ablation of a source checkout" in err
    assert "python -m experiments.ablation --demo-root DIR" in err


def test_the_package_never_imports_the_experiments():
    import ast

    package = Path(__file__).resolve().parents[1] / "m3i"
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(package)}: {n}" for n in names if n.split(".")[0] == "experiments"]
    assert not found


def test_panel_chart_draws_each_series_in_one_colour_and_a_dashed_reference():
    from m3i.evaluate.plot import panel_chart_png

    flat = {"a": ([0, 4], [60.0, 60.0]), "b": ([0, 4], [80.0, 80.0])}
    png = panel_chart_png({"p1": flat, "p2": {"b": flat["b"]}}, reference={"p1": 20.0}, ylabel="top-1 %")
    with Image.open(io.BytesIO(png)) as img:
        px = img.convert("RGB").load()
        width, height = img.size
        grey = (120, 120, 120)
        # the reference: dashes on one row of the first panel only, 6 px on, 6 px off from the left edge
        rows = [y for y in range(60, 226) if px[73, y] == grey]  # inside the first panel (its box: rows 58-228)
        assert len(rows) == 1 and not any(px[73, y] == grey for y in range(height // 2, height))
        assert [px[x, rows[0]] == grey for x in (71, 75, 79, 83, 87)] == [True, True, False, True, True]
        # series "b" keeps its colour (the palette's second) in both panels
        def colours(y0: int, y1: int) -> set:
            return {px[400, y] for y in range(y0, y1)}

        assert (219, 68, 55) in colours(0, height // 2) and (219, 68, 55) in colours(height // 2, height)
        assert (66, 133, 244) in colours(0, height // 2) and (66, 133, 244) not in colours(height // 2, height)
    with pytest.raises(ValueError, match="series 'a' of panel 'p' has 2 x and 1 y values"):
        panel_chart_png({"p": {"a": ([0, 1], [1.0])}})
    with pytest.raises(ValueError, match="at least one panel"):
        panel_chart_png({})
