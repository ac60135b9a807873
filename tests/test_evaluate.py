"""`m3i evaluate`: kNN and linear probe with known answers, outputs, checkpoint / export / s3 sources, push."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from m3i.config import EvaluateConfig, load_config
from m3i.evaluate import (
    Features,
    classification_metrics,
    embed,
    feature_spread,
    knn_scores,
    linear_probe,
    load_encoder,
    load_exported,
    push_metrics,
    score_features,
    topk_accuracy,
)
from tests.conftest import free_port
from tests.helpers import shard_small, small_demo, train_env, write_train_config
from tests.prometheus import parse_metrics, pushgateway  # noqa: F401 - a fixture

CLASSES = [f"c{i}" for i in range(10)]


def clusters(per_class: int, num_classes: int = 10, dim: int = 32, noise: float = 0.3, seed: int = 0):
    """Perfectly separable data: fixed, well-separated class centres plus small noise drawn from ``seed``."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 4  # [C, D]
    y = torch.arange(num_classes).repeat_interleave(per_class)  # [N]
    x = centres[y] + noise * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed))  # [N, D]
    return x, y


# ---------------------------------------------------------------------------- known answers


def test_separable_clusters_score_100_percent():
    x, y = clusters(40)
    xe, ye = clusters(15, seed=1)  # same centres, fresh noise
    votes = knn_scores(x, y, xe, 10, k=20, temperature=0.07)
    assert topk_accuracy(votes, ye) == {1: 1.0, 5: 1.0}
    logits = linear_probe(x, y, xe, 10, epochs=50)
    assert topk_accuracy(logits, ye)[1] == 1.0


def test_shuffled_labels_score_chance():
    x, y = clusters(100)  # 1000 training points, 10 classes
    xe, ye = clusters(100, seed=3)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    knn = topk_accuracy(knn_scores(x, shuffled, xe, 10), ye)[1]
    probe = topk_accuracy(linear_probe(x, shuffled, xe, 10, epochs=30), ye)[1]
    # chance is 0.10; the std of an accuracy over 1000 points is about 0.01
    assert 0.05 <= knn <= 0.16, knn
    assert 0.05 <= probe <= 0.16, probe


def test_top5_counts_a_label_ranked_anywhere_in_the_first_five():
    scores = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # label 0: rank 1
            [9.0, 8, 7, 6, 5, 4, 3],  # label 4: rank 5
            [9.0, 8, 7, 6, 5, 4, 3],  # label 5: rank 6
        ]
    )
    acc = topk_accuracy(scores, torch.tensor([0, 4, 5]), (1, 5))
    assert acc[1] == pytest.approx(1 / 3) and acc[5] == pytest.approx(2 / 3)
    # fewer classes than k: top-5 of 3 classes is every class
    assert topk_accuracy(torch.tensor([[0.1, 0.5, 0.2]]), torch.tensor([0]))[5] == 1.0


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])  # one close class-0, two farther class-1
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    sharp = knn_scores(bank, labels, query, 2, k=3, temperature=0.07)
    flat = knn_scores(bank, labels, query, 2, k=3, temperature=10.0)
    assert sharp.argmax().item() == 0  # exp(1/0.07) >> 2 exp(0.6/0.07)
    assert flat.argmax().item() == 1  # nearly one vote each: two beat one
    assert sharp[0, 0] == pytest.approx(torch.exp(torch.tensor(1 / 0.07)).item(), rel=1e-4)
    # k above the bank size: all of it votes
    assert knn_scores(bank, labels, query, 2, k=50, temperature=10.0).sum() == pytest.approx(flat.sum().item())


def test_knn_and_probe_reject_bad_input():
    x, y = clusters(2)
    with pytest.raises(ValueError, match="features must be"):
        knn_scores(x, y, x[:, :3], 10)
    with pytest.raises(ValueError, match="k="):
        knn_scores(x, y, x, 10, k=0)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(x, y[:3], x, 10)


def test_classification_metrics_confusion_and_per_class():
    scores = torch.eye(3)[[0, 1, 1, 2, 0]]  # predictions 0 1 1 2 0
    m = classification_metrics(scores, torch.tensor([0, 1, 2, 2, 1]), ["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert m["per_class"] == {"a": 1.0, "b": 0.5, "c": 0.5}
    assert m["top1"] == pytest.approx(0.6) and m["mean_class_top1"] == pytest.approx(2 / 3)
    m = classification_metrics(torch.eye(3)[[0]], torch.tensor([0]), ["a", "b", "c"])
    assert m["per_class"]["b"] is None  # no sample of that class


def test_score_features_and_collapse_monitor():
    x, y = clusters(20)
    s = score_features(Features(x, y), Features(x, y), CLASSES, EvaluateConfig(probe_epochs=20))
    assert s["knn"]["top1"] == 1.0 and s["counts"] == {"train": 200, "eval": 200} and s["feature_dim"] == 32
    assert s["feature_std"]["eval"] > 0.5
    assert feature_spread(torch.ones(50, 8) + 1e-9 * torch.randn(50, 8)) < 1e-3  # collapsed


def test_linear_probe_is_deterministic_per_seed():
    x, y = clusters(10, noise=3.0)
    a = linear_probe(x, y, x, 10, epochs=5, seed=1)
    assert torch.equal(a, linear_probe(x, y, x, 10, epochs=5, seed=1))
    assert not torch.equal(a, linear_probe(x, y, x, 10, epochs=5, seed=2))


def test_eval_view_uses_the_models_own_mean_std_and_crop():
    import numpy as np

    from m3i.evaluate import Encoder, eval_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    from m3i.data import to_device

    view = eval_transform(Encoder(None, 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.8))
    x = view({"image": img, "cls": 3})
    # crop_pct 0.8: the short side is resized to 16 / 0.8 = 20 (no-op here), then the centre 16 x 16 kept
    raw = torch.from_numpy(np.asarray(img)[2:18, 2:18].copy()).permute(2, 0, 1)
    assert x["cls"] == 3 and x["image"].shape == (3, 16, 16) and torch.equal(x["image"], raw)  # pixels
    assert (view.mean, view.std) == ((0.5,) * 3, (0.25,) * 3)  # what extract_features normalises with on the device
    normalised = to_device(x, "cpu", None, view.mean, view.std)["image"]
    assert torch.allclose(normalised, (raw.float() / 255 - 0.5) / 0.25, atol=1e-5)


# ---------------------------------------------------------------------------- config


def test_config_defaults():
    cfg = load_config(None).evaluate
    assert (cfg.k, cfg.knn_temperature, cfg.train_split, cfg.eval_split, cfg.finetune_steps, cfg.pushgateway) == (
        20, 0.07, "train", "eval", 0, ""
    )


@pytest.mark.parametrize(
    "key, bad",
    [
        ("k", 0),
        ("knn_temperature", 0),
        ("train_split", "test"),
        ("eval_split", "train"),  # the same as train_split
        ("probe_epochs", 0),
        ("probe_lr", -1),
        ("probe_weight_decay", -0.1),
        ("probe_batch_size", 0),
        ("finetune_steps", -1),
        ("finetune_lr", 0),
        ("out", ""),
        ("pushgateway", "ftp://pg:9091"),
        ("pushgateway", "http://pg host:9091"),
        ("batch_size", 0),
        ("num_workers", -1),
        ("device", "gpu"),
    ],
)
def test_config_rejects_bad_values(key, bad):
    with pytest.raises(ValueError, match=f"evaluate.{'eval_split' if key == 'eval_split' else key}"):
        load_config(None, overrides=[f"evaluate.{key}={bad}"])


def test_cli_bad_value_exits_2(capsys):
    from m3i.cli import main

    assert main(["evaluate", "--set", "evaluate.k=0"]) == 2
    assert "evaluate.k=0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, cuda, want",
    [("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cpu", False, "cpu"), ("cuda", True, "cuda")],
)
def test_device_resolution(monkeypatch, setting, cuda, want):
    from m3i.data import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(EvaluateConfig(device=setting).device).type == want


def test_cuda_without_cuda_is_a_clear_error_exit_2_before_any_loading(monkeypatch, capsys, tmp_path):
    from m3i.cli import main
    from m3i.data import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"evaluate.device='cuda' but CUDA is not available here \(torch .* device\(s\) visible"):
        resolve_device("cuda")
    # The model does not exist: the device is checked first, so its error is the one reported.
    assert main(["evaluate", "--set", "evaluate.device=cuda", "--set", f"evaluate.model={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err
    assert "m3i evaluate: error: evaluate.device='cuda' but CUDA is not available" in err and len(err.splitlines()) == 1


def test_no_model_or_a_folder_without_one_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="evaluate.model=''"):
        load_encoder("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an exported model"):
        load_encoder(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shards of the small demo set and a 2-step, 1-process training run on them."""
    root = tmp_path_factory.mktemp("evaluate")
    shards = str(root / "shards")
    shard_small(small_demo(root / "raw"), shards)
    run = root / "run"
    cfg = write_train_config(root / "train.yaml", shards, str(run), train={"steps": 2, "warmup_steps": 1}, data={"num_workers": 0})
    env = train_env() | {"MASTER_PORT": str(free_port())}  # a plain one-process run; not the default port
    r = subprocess.run([sys.executable, "-m", "m3i", "-q", "train", "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root, "shards": shards, "run": run, "train_yaml": cfg}


def _eval_args(trained, model: str, out: Path | str, *extra: str) -> list[str]:
    return [
        "-q", "evaluate", "--config", str(trained["train_yaml"]), "--model", model, "--out", str(out),
        "--set", "evaluate.probe_epochs=20", "--set", "evaluate.batch_size=16", *extra,
    ]


@pytest.mark.slow
def test_evaluate_a_checkpoint_writes_every_output(trained, tmp_path, capsys):
    from m3i.cli import main

    out = tmp_path / "eval"
    assert main(_eval_args(trained, str(trained["run"]), out, "--set", "evaluate.finetune_steps=2", "--set", "evaluate.num_workers=2")) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1: random init " in printed and "linear probe top-1: random init " in printed and "fine-tune top-1: " in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["kind"] == "checkpoint" and m["model"]["step"] == 2
    assert m["counts"] == {"train": 48, "eval": 16} and m["num_classes"] == 6  # every labelled sample once; six demo shapes
    for method in ("knn", "probe", "finetune"):
        assert 0.0 <= m[method]["top1"] <= m[method]["top5"] <= 1.0
        assert sum(map(sum, m[method]["confusion"])) == 16
    kfp = json.loads((out / "kfp_metrics.json").read_text())
    assert {"knn_top1", "knn_top5", "probe_top1", "probe_top5", "finetune_top1", "feature_std", "eval_samples"} <= set(kfp)
    assert all(isinstance(v, float) for v in kfp.values())
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["categories"] == m["classes"] and len(cm["matrix"]) == 6 and all(len(r) == 6 for r in cm["matrix"])
    with Image.open(out / "confusion.png") as img:
        assert img.format == "PNG" and img.width > 200
    assert "| linear probe |" in (out / "report.md").read_text()
    # one checkpoint's folder is a model URI too, and scores the same
    out2 = tmp_path / "eval2"
    assert main(_eval_args(trained, str(trained["run"] / "checkpoints" / "step-00000002"), out2)) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert (m2["knn"]["top1"], m2["probe"]["top1"]) == (m["knn"]["top1"], m["probe"]["top1"])


def _backbone_state(run: Path) -> dict[str, torch.Tensor]:
    from tests.helpers import final_weights

    return {k[len("backbone.") :]: v for k, v in final_weights(run, 2).items() if k.startswith("backbone.")}


def test_encoder_features_equal_the_training_models_encode(trained):
    from m3i.config import Config
    from m3i.config.core import from_dict
    from m3i.models import build_model
    from tests.helpers import final_weights

    enc = load_encoder(str(trained["run"]))
    manifest = json.loads((trained["run"] / "checkpoints" / "step-00000002" / "complete.json").read_text())
    model = build_model(from_dict(Config, manifest["config"]), num_classes=manifest["num_classes"]).eval()
    model.load_state_dict(final_weights(trained["run"], 2))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(embed(enc.module, x), model.encode(x), atol=1e-6)


def _handmade_export(trained, folder: Path) -> Path:
    """An exported-model folder as the export format describes it: timm keys + config.json."""
    from safetensors.torch import save_file

    from m3i.config import Config
    from m3i.config.core import from_dict
    from m3i.models import backbone_kwargs

    manifest = json.loads((trained["run"] / "checkpoints" / "step-00000002" / "complete.json").read_text())
    arch, kwargs = backbone_kwargs(from_dict(Config, manifest["config"]))
    args = {k: v for k, v in kwargs.items() if k not in ("pretrained", "drop_path_rate")}
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in _backbone_state(trained["run"]).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "model_args": args, "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    return folder


@pytest.mark.slow
def test_an_exported_model_scores_exactly_like_its_checkpoint(trained, tmp_path):
    from m3i.cli import main
    from m3i.config import load_config
    from m3i.export import export

    exported = export(load_config(None, trained["train_yaml"], [f"export.checkpoint={trained['run']}", f"export.out={tmp_path / 'models'}"]))
    handmade = _handmade_export(trained, tmp_path / "handmade")
    ckpt = load_encoder(str(trained["run"]))
    x = torch.randn(2, 3, 32, 32)
    for folder in (exported.uri, str(handmade)):
        plain = load_exported(folder)  # what a timm user gets
        with torch.no_grad():
            assert torch.equal(embed(plain, x), embed(ckpt.module, x))
    scores = {}
    for name, model in (("ckpt", str(trained["run"])), ("export", exported.uri)):
        assert main(_eval_args(trained, model, tmp_path / name)) == 0
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        scores[name] = (m["knn"]["top1"], m["knn"]["top5"], m["probe"]["top1"], m["probe"]["confusion"])
    assert scores["ckpt"] == scores["export"]
    m = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert m["model"]["kind"] == "exported" and m["model"]["step"] == 2 and m["model"]["image_size"] == 32


@pytest.mark.slow
def test_a_model_is_scored_on_its_recorded_data_unless_data_shards_is_set(trained, tmp_path, caplog):
    import logging
    import shutil

    from m3i.cli import main
    from m3i.export import export

    exported = export(load_config(None, trained["train_yaml"], [f"export.checkpoint={trained['run']}", f"export.out={tmp_path / 'models'}"]))
    assert json.loads((Path(exported.uri) / "export.json").read_text())["data_shards"] == trained["shards"]
    small = ["--set", "evaluate.probe_epochs=5", "--set", "evaluate.batch_size=16", "--set", "evaluate.num_workers=0"]
    for name, model in (("export", exported.uri), ("run", str(trained["run"]))):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="m3i"):
            # no --config: data.shards is nowhere, so the default would be m3i-data/shards (absent here)
            assert main(["evaluate", "--model", model, "--out", str(tmp_path / name), *small]) == 0
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["data"]["shards"] == trained["shards"] and m["counts"] == {"train": 48, "eval": 16}
        assert f"data: {trained['shards']} (the data set the model records" in caplog.text
    other = shutil.copytree(trained["shards"], tmp_path / "other-shards")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m3i"):
        assert main(["evaluate", "--model", exported.uri, "--out", str(tmp_path / "explicit"), "--set", f"data.shards={other}", *small]) == 0
    assert json.loads((tmp_path / "explicit" / "metrics.json").read_text())["data"]["shards"] == str(other)
    assert f"data: {other} (data.shards as given)" in caplog.text


def test_is_set_tells_a_given_value_from_a_default(tmp_path):
    from m3i.config import is_set

    f = tmp_path / "c.yaml"
    f.write_text("data:\n  shards: /x\n")
    assert not is_set("data.shards", "demo", None, ["evaluate.k=5"])
    assert is_set("data.shards", None, None, ["data.shards=/y"]) and is_set("data.shards", None, f)
    assert is_set("evaluate.k", None, None, ["evaluate.k=5"]) and not is_set("evaluate.model", None, f)


@pytest.mark.s3
@pytest.mark.slow
def test_evaluate_a_model_and_write_results_on_s3(trained, tmp_path, s3_bucket):
    from m3i.cli import main
    from m3i.storage import open_store

    handmade = _handmade_export(trained, tmp_path / "handmade")
    store = open_store(f"{s3_bucket}/models/tiny")
    for f in handmade.iterdir():
        store.put_file(f.name, str(f))
    out = f"{s3_bucket}/eval/tiny"
    assert main(_eval_args(trained, f"{s3_bucket}/models/tiny", out)) == 0
    results = open_store(out)
    m = results.read_json("metrics.json")
    assert m["model"]["kind"] == "exported" and m["counts"]["eval"] == 16
    assert {"kfp_metrics.json", "confusion_matrix.json", "confusion.png", "report.md"} <= {o.key for o in results.list()}

    # a run's output on s3: its latest complete checkpoint is found and read
    run = open_store(f"{s3_bucket}/runs/tiny")
    for f in sorted((trained["run"] / "checkpoints").rglob("*")):
        if f.is_file():
            run.put_file(f.relative_to(trained["run"]).as_posix(), str(f))
    enc = load_encoder(f"{s3_bucket}/runs/tiny")
    x = torch.randn(2, 3, 32, 32)
    assert enc.kind == "checkpoint" and enc.step == 2
    with torch.no_grad():
        assert torch.equal(embed(enc.module, x), embed(load_exported(str(handmade)), x))


def _as_written_by_format_1(folder: Path) -> Path:
    """An export as m3i wrote it before the network had a name of its own: ``config.json`` without
    ``m3i_architecture`` and ``export.json``'s ``architecture`` timm's constructor."""
    config = json.loads((folder / "config.json").read_text())
    del config["m3i_architecture"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((folder / "export.json").read_text())
    manifest.update(format_version=1, architecture=manifest.pop("timm_architecture"))
    (folder / "export.json").write_text(json.dumps(manifest, indent=2))
    return folder


def test_an_export_of_the_old_format_still_evaluates_and_initialises_a_run(trained, tmp_path):
    import shutil

    from m3i.export import export
    from m3i.models import build_model
    from m3i.train.loop import init_backbone

    new = export(load_config(None, trained["train_yaml"], [f"export.checkpoint={trained['run']}", f"export.out={tmp_path / 'models'}"]))
    old = _as_written_by_format_1(Path(shutil.copytree(new.uri, tmp_path / "old")))
    assert json.loads((old / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    encoders = {"old": load_encoder(str(old)), "new": load_encoder(new.uri), "checkpoint": load_encoder(str(trained["run"]))}
    x = torch.randn(2, 3, 32, 32)
    for source, enc in encoders.items():  # one name for one network, however it is stored
        assert enc.info["architecture"] == "vit_w96_d4_h3_p8_32" and enc.info["timm_architecture"] == "vit_tiny_patch16_224", source
        with torch.no_grad():
            assert torch.equal(embed(enc.module, x), embed(encoders["checkpoint"].module, x)), source

    m = _evaluate(trained, str(old), tmp_path / "eval").metrics
    assert m["model"]["kind"] == "exported" and m["model"]["step"] == 2 and m["model"]["architecture"] == "vit_w96_d4_h3_p8_32"
    assert m["random_init"]["architecture"] == "vit_w96_d4_h3_p8_32" and 0.0 <= m["knn"]["top1"] <= 1.0

    cfg = load_config(None, trained["train_yaml"], [f"train.init_from={old}"])
    model = build_model(cfg, num_classes=6)
    assert init_backbone(cfg, model)["kind"] == "exported"
    want = encoders["old"].module.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.backbone.state_dict().items())


# ---------------------------------------------------------------------------- random-init baseline, loss curves


def _evaluate(trained, model: str, out: Path, *sets: str):
    """``m3i evaluate`` through the library with the fixture's config (small probe, small batches)."""
    from m3i.evaluate import evaluate

    overrides = [f"evaluate.model={model}", f"evaluate.out={out}", "evaluate.probe_epochs=10", "evaluate.batch_size=16", *sets]
    return evaluate(load_config(None, trained["train_yaml"], overrides))


def test_random_init_baseline_scores_the_backbone_training_started_from(trained, tmp_path):
    from m3i.config import Config
    from m3i.config.core import from_dict
    from m3i.evaluate import eval_transform, extract_features, read_split_index
    from m3i.models import build_model

    # The probe's seed (evaluate.seed) differs from train.seed: only the latter may seed the backbone.
    r = _evaluate(trained, str(trained["run"]), tmp_path / "eval", "evaluate.seed=3")
    m, base = r.metrics, r.metrics["random_init"]
    assert set(base) >= {"seed", "seed_source", "knn", "probe", "feature_std"}
    for key in ("knn", "probe", "feature_std"):
        assert set(base[key]) == set(m[key]), key
    manifest = json.loads((trained["run"] / "checkpoints" / "step-00000002" / "complete.json").read_text())
    cfg = from_dict(Config, manifest["config"])
    assert (base["seed"], base["seed_source"]) == (cfg.train.seed, "run config")

    # Independently: the model training builds after its seed (the train loop's order), scored the same way.
    torch.manual_seed(cfg.train.seed)
    backbone = build_model(cfg, num_classes=manifest["num_classes"]).backbone
    trained_encoder = load_encoder(str(trained["run"]))
    assert not torch.equal(backbone.pos_embed, trained_encoder.module.pos_embed)  # not the trained weights
    index = read_split_index(trained["shards"])
    view = eval_transform(trained_encoder)
    train, test = (extract_features(backbone, index, split, view, batch_size=16) for split in ("train", "eval"))
    want = score_features(train, test, index.classes, EvaluateConfig(probe_epochs=10, seed=3))
    for key in ("knn", "probe"):
        got = (base[key]["top1"], base[key]["top5"], base[key]["confusion"])
        assert got == (want[key]["top1"], want[key]["top5"], want[key]["confusion"]), key
    assert base["feature_std"] == pytest.approx(want["feature_std"])

    kfp = json.loads((tmp_path / "eval" / "kfp_metrics.json").read_text())
    for method in ("knn", "probe"):
        assert kfp[f"random_init_{method}_top1"] == pytest.approx(base[method]["top1"])
        assert kfp[f"{method}_gain_top1"] == pytest.approx(m[method]["top1"] - base[method]["top1"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"| linear probe | random init {100 * base['probe']['top1']:.2f} % -> trained {100 * m['probe']['top1']:.2f} % |" in report


def test_an_exports_random_init_uses_its_recorded_seed_else_0(trained, tmp_path):
    import timm

    from m3i.evaluate import random_init

    handmade = _handmade_export(trained, tmp_path / "handmade")
    enc, ckpt = load_encoder(str(handmade)), load_encoder(str(trained["run"]))
    assert (enc.seed, enc.seed_source) == (0, "default") and ckpt.seed == 0
    rng = torch.get_rng_state()
    a, b = random_init(enc).state_dict(), random_init(ckpt).state_dict()
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is left alone
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same architecture, same seed

    (handmade / "export.json").write_text(json.dumps({"seed": 5}))
    enc = load_encoder(str(handmade))
    assert (enc.seed, enc.seed_source) == (5, "export.json")
    config = json.loads((handmade / "config.json").read_text())
    torch.manual_seed(5)
    want = timm.create_model(config["architecture"], **{**config["model_args"], "pretrained": False, "num_classes": 0}).state_dict()
    got = random_init(enc).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_random_init_off_and_no_history_leave_both_out(trained, tmp_path):
    assert load_config(None).evaluate.random_init is True
    out = tmp_path / "eval"
    r = _evaluate(trained, str(_handmade_export(trained, tmp_path / "handmade")), out, "evaluate.random_init=false")
    assert "random_init" not in r.metrics and "history" not in r.metrics
    kfp = json.loads((out / "kfp_metrics.json").read_text())
    assert "knn_top1" in kfp and not [k for k in kfp if k.startswith("random_init") or "gain" in k]
    assert not (out / "loss_curves.png").exists() and "loss_curves.png" not in r.files and set(r.figures) == {"confusion.png"}
    report = (out / "report.md").read_text()
    assert "random init" not in report and "loss_curves" not in report


def test_loss_curves_are_drawn_from_the_models_history(trained, tmp_path):
    from m3i.evaluate import render_html
    from m3i.train.history import History

    handmade = _handmade_export(trained, tmp_path / "handmade")
    history = History(str(handmade))
    for step in range(1, 31):  # the text branch is off: its loss is 0 at every step
        history.append({"step": step, "lr": 1e-3, "loss": 3.0 - 0.05 * step, "loss_img": 1.0 - 0.01 * step,
                        "loss_cls": 2.0 - 0.04 * step, "loss_txt": 0.0})
    history.flush()
    out = tmp_path / "eval"
    r = _evaluate(trained, str(handmade), out, "evaluate.random_init=false")
    assert r.metrics["history"]["drawn"] == ["loss", "loss_img", "loss_cls"]
    assert r.metrics["history"]["steps"] == 30 and r.metrics["history"]["last"]["loss"] == pytest.approx(1.5)
    png = out / "loss_curves.png"
    assert r.files["loss_curves.png"].endswith("loss_curves.png") and r.figures["loss_curves.png"] == png.read_bytes()
    with Image.open(png) as img:
        img.verify()
        assert img.format == "PNG" and img.width >= 600 and img.height > 3 * 150  # one panel per drawn part
    assert "![training loss per part against step](loss_curves.png)" in (out / "report.md").read_text()
    page = render_html(r.metrics, r.figures)  # the KFP HTML artifact: both figures inline
    assert page.count('src="data:image/png;base64,') == 2


def test_a_checkpoints_history_is_its_runs():
    from m3i.artifacts import run_output_of

    _run_output = lambda uri: run_output_of(uri) or ""  # noqa: E731  (how evaluate reads it)

    assert _run_output("/r/run/checkpoints/step-00000002") == "/r/run"
    assert _run_output("s3://b/runs/a/checkpoints/step-00000002/") == "s3://b/runs/a"
    assert _run_output("checkpoints/step-00000002") == "."  # evaluated from inside the run's folder
    assert _run_output("/elsewhere/step-00000002") == ""


def test_history_stops_at_the_scored_step_and_a_missing_one_is_empty(tmp_path):
    from m3i.evaluate import Encoder, find_history
    from m3i.train.history import History

    history = History(str(tmp_path / "run"))
    for step in range(1, 21):
        history.append({"step": step, "loss": 1.0})
    history.flush()
    assert [r["step"] for r in find_history(Encoder(None, 32, step=10, history_uri=str(tmp_path / "run")))] == list(range(1, 11))
    assert len(find_history(Encoder(None, 32, history_uri=str(tmp_path / "run")))) == 20
    assert find_history(Encoder(None, 32, step=10, history_uri=str(tmp_path / "nothing"))) == []
    assert find_history(Encoder(None, 32)) == []


def test_loss_series_keeps_non_zero_parts_and_skips_missing_values():
    from m3i.evaluate import loss_series

    rows = [{"step": 1, "loss": 2.0, "loss_img": 0.0, "loss_cls": 1.0}, {"step": 2, "loss": None, "loss_img": 0.0, "loss_cls": 0.5}]
    assert loss_series(rows) == {"loss": ([1], [2.0]), "loss_cls": ([1, 2], [1.0, 0.5])}
    assert loss_series([]) == {}


def test_report_scalars_and_lines_put_random_init_against_trained():
    from m3i.evaluate import kfp_scalars, render_report, score_lines

    m = _synthetic_metrics()
    kfp = kfp_scalars(m)
    for method in ("knn", "probe"):
        for key in ("top1", "top5", "mean_class_top1"):
            assert kfp[f"random_init_{method}_{key}"] == pytest.approx(m["random_init"][method][key])
        assert kfp[f"{method}_gain_top1"] == pytest.approx(m[method]["top1"] - m["random_init"][method]["top1"])
    assert kfp["probe_gain_top1"] > 0.3  # class clusters against noise
    p, b = m["probe"]["top1"], m["random_init"]["probe"]["top1"]
    assert f"| linear probe | random init {100 * b:.2f} % -> trained {100 * p:.2f} % | {100 * (p - b):+.2f} |" in render_report(m)
    assert f"linear probe top-1: random init {100 * b:.1f} % -> trained {100 * p:.1f} % ({100 * (p - b):+.1f})" in score_lines(m)[1]
    m.pop("random_init")
    assert not [k for k in kfp_scalars(m) if k.startswith("random_init") or "gain" in k]
    assert "random init" not in render_report(m) + " ".join(score_lines(m))
    assert score_lines(m, top5=False)[1] == f"linear probe top-1: {100 * p:.1f} %"


def test_report_warns_of_collapse_only_below_the_threshold():
    from m3i.evaluate import render_report
    from m3i.evaluate.report import COLLAPSE_STD

    m = _synthetic_metrics()
    m["feature_std"]["eval"] = 0.0734
    assert "feature std (eval) 0.0734\n" in render_report(m) and "collapse" not in render_report(m)
    m["feature_std"]["eval"] = COLLAPSE_STD / 10
    assert "the features may have collapsed" in render_report(m)


def test_push_sends_the_baseline_as_methods_of_its_own(monkeypatch):
    import m3i.evaluate.report as report

    sent = {}
    monkeypatch.setattr(report, "push_to_gateway", lambda url, job, registry, grouping_key, timeout: sent.update(registry=registry))
    m = _synthetic_metrics()
    assert push_metrics("http://pg:9091", m)
    acc = {
        (s.labels["method"], s.labels["topk"]): s.value
        for family in sent["registry"].collect() if family.name == "m3i_evaluate_accuracy_ratio" for s in family.samples
    }
    assert {method for method, _ in acc} == {"knn", "probe", "random_init_knn", "random_init_probe"}
    assert acc[("random_init_probe", "1")] == pytest.approx(m["random_init"]["probe"]["top1"])
    assert acc[("probe", "1")] == pytest.approx(m["probe"]["top1"])


# ---------------------------------------------------------------------------- Pushgateway


def _synthetic_metrics() -> dict:
    x, y = clusters(10)
    m = score_features(Features(x, y), Features(x, y), CLASSES, EvaluateConfig(probe_epochs=5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # features that know nothing of the classes
    base = score_features(Features(noise, y), Features(noise, y), CLASSES, EvaluateConfig(probe_epochs=5))
    return {
        **m,
        "model": {"name": "tiny", "run_id": "run/eval", "uri": "/models/tiny", "kind": "exported", "step": 3},
        "data": {"shards": "/data/tiny", "train_split": "train", "eval_split": "eval"},
        "classes": CLASSES,
        "num_classes": len(CLASSES),
        "random_init": {"seed": 0, "seed_source": "default", "architecture": "vit", **{k: base[k] for k in ("knn", "probe", "feature_std")}},
    }


def test_push_to_an_unreachable_gateway_only_warns(caplog):
    assert push_metrics(f"http://127.0.0.1:{free_port()}", _synthetic_metrics(), timeout=2) is False
    assert "pushing the evaluation scores" in caplog.text


@pytest.mark.prometheus
def test_scores_reach_the_pushgateway(pushgateway):  # noqa: F811 - the fixture
    metrics = _synthetic_metrics()
    assert push_metrics(pushgateway.url, metrics)
    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=5) as r:
        pushed = parse_metrics(r.read().decode())
    acc = {
        (labels["method"], labels["topk"]): v
        for (name, labelset), v in pushed.items()
        if name == "m3i_evaluate_accuracy_ratio" and (labels := dict(labelset))["job"] == "m3i-evaluate"
        and labels["model"] == "tiny" and labels["run_id"] == "run/eval"
    }
    want = {(method, k): pytest.approx(metrics[method][f"top{k}"]) for method in ("knn", "probe") for k in ("1", "5")}
    want |= {(f"random_init_{m}", k): pytest.approx(metrics["random_init"][m][f"top{k}"]) for m in ("knn", "probe") for k in ("1", "5")}
    assert acc == want and acc[("knn", "1")] == 1.0
    samples = {dict(ls)["split"]: v for (name, ls), v in pushed.items() if name == "m3i_evaluate_samples"}
    assert samples == {"train": 100, "eval": 100}
