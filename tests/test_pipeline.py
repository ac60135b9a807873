"""The Kubeflow pipeline m3i-pretrain: compiled IR, Kubernetes platform spec, caching plan, steps, local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from m3i.pipeline import CPU_IMAGE, PIPELINE_NAME, REGISTRY_SECRET, S3_SECRET, TRAIN_IMAGE
from m3i.pipeline.build import SOURCE_PIPELINE, compile_pipeline, version_name
from m3i.pipeline.steps import (
    LAUNCHERS,
    config_overrides_from_file,
    list_sources,
    plan_dataset,
    run_uri,
    shard_dataset,
    stage_sources,
    train_model,
    verify_dataset,
)
from m3i.storage import open_store
from tests.helpers import SMALL, small_demo

ROOT = Path(__file__).resolve().parents[1]
SECRET_VALUE = "pipeline-test-secret-value-9f2c"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Compile into a temp file with credentials in the environment (they must not leak into it)."""
    out = tmp_path_factory.mktemp("pipeline") / "m3i-pretrain.yaml"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET_VALUE, "AWS_ACCESS_KEY_ID": SECRET_VALUE, "KFP_TOKEN": SECRET_VALUE}
    code = f"from m3i.pipeline.build import compile_pipeline; compile_pipeline({str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)
    spec, platform = yaml.safe_load_all(out.read_text())
    return out, spec, platform


def test_committed_pipeline_is_current(compiled):
    out, _, _ = compiled
    assert SOURCE_PIPELINE.read_bytes() == out.read_bytes(), (
        f"{SOURCE_PIPELINE.relative_to(ROOT)} is stale: run `m3i pipeline compile` and commit the result"
    )


def test_compiling_twice_gives_the_same_bytes(compiled, tmp_path):
    out, _, _ = compiled
    assert compile_pipeline(tmp_path / "again.yaml").read_bytes() == out.read_bytes()


def test_no_credentials_in_the_compiled_pipeline(compiled):
    out, _, platform = compiled
    text = out.read_text()
    assert SECRET_VALUE not in text
    # Only the Secret's name and key names appear: env vars come from secretAsEnv.
    for name, ex in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        ref, *more = ex["secretAsEnv"]
        assert ref["secretName"] == S3_SECRET
        assert {k["secretKey"] for k in ref["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
        # the promote steps also get the Model Registry token, by reference and optional (the mirror is off by default)
        assert more == ([{
            "secretName": REGISTRY_SECRET, "secretNameParameter": {"runtimeValue": {"constant": REGISTRY_SECRET}},
            "keyToEnv": [{"secretKey": "token", "envVar": "M3I_MODEL_REGISTRY_TOKEN"}], "optional": True,
        }] if name.startswith("exec-promote") else []), name
    for ex in _executors(compiled).values():
        env = {e["name"]: e.get("value") for e in ex["container"].get("env", [])}
        assert not set(env) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KFP_TOKEN"}


def _executors(compiled) -> dict:
    return compiled[1]["deploymentSpec"]["executors"]


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG, by name."""
    out = {}
    for comp in [spec["root"], *spec["components"].values()]:
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def test_tasks_edges_and_caching(compiled):
    _, spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == PIPELINE_NAME
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"plan", "shard", "champion", "condition-branches-1", "export", "evaluate", "gate", "condition-branches-4"}
    deps = {k: set(v.get("dependentTasks", [])) for k, v in root.items()}
    assert deps == {
        "plan": set(),
        "shard": {"plan"},
        "champion": set(),
        "condition-branches-1": {"shard", "champion"},
        "export": {"condition-branches-1"},
        "evaluate": {"export", "shard"},
        "gate": {"export", "evaluate"},
        "condition-branches-4": {"gate", "export", "evaluate"},
    }
    tasks = _all_tasks(spec)
    assert {"train", "train-2", "promote", "promote-2"} <= set(tasks)
    # shard is cached (keyed by plan's cache_key); everything that reads mutable storage is not.
    assert tasks["shard"]["cachingOptions"] == {"enableCache": True}
    for name in ("plan", "champion", "train", "train-2", "export", "evaluate", "gate", "promote", "promote-2"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    assert tasks["shard"]["inputs"]["parameters"]["cache_key"]["taskOutputParameter"] == {
        "outputParameterKey": "cache_key",
        "producerTask": "plan",
    }
    # Every step has a display name; the inputs of every component carry descriptions.
    for name, t in tasks.items():
        if name.startswith("condition"):
            continue
        assert ":" in t["taskInfo"]["name"], name
    for cname in ("comp-plan", "comp-shard", "comp-champion", "comp-train", "comp-export", "comp-evaluate", "comp-gate", "comp-promote"):
        params = spec["components"][cname]["inputDefinitions"]["parameters"]
        assert all(p.get("description") for p in params.values()), cname


def test_train_branches_and_checkpoint_handoff(compiled):
    _, spec, _ = compiled
    comps = spec["components"]
    branches = comps["comp-condition-branches-1"]["dag"]
    conds = {t: v["triggerPolicy"]["condition"] for t, v in branches["tasks"].items()}
    assert conds == {
        "condition-2": "inputs.parameter_values['pipelinechannel--launcher'] == 'inline'",
        "condition-3": "!(inputs.parameter_values['pipelinechannel--launcher'] == 'inline')",
    }
    sel = branches["outputs"]["parameters"]["pipelinechannel--condition-branches-1-oneof-1"]["valueFromOneof"]["parameterSelectors"]
    assert [s["producerSubtask"] for s in sel] == ["condition-2", "condition-3"]
    export_in = spec["root"]["dag"]["tasks"]["export"]["inputs"]["parameters"]["checkpoint_uri"]
    assert export_in["taskOutputParameter"]["producerTask"] == "condition-branches-1"
    inline = comps["comp-condition-2"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert inline["launcher"]["runtimeValue"]["constant"] == "inline"
    job = comps["comp-condition-3"]["dag"]["tasks"]["train-2"]["inputs"]["parameters"]
    assert job["launcher"]["componentInputParameter"] == "pipelinechannel--launcher"
    assert inline["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_images_and_resources(compiled):
    ex = _executors(compiled)
    images = {k: v["container"]["image"] for k, v in ex.items()}
    assert images == {
        "exec-plan": CPU_IMAGE,
        "exec-shard": CPU_IMAGE,
        "exec-train": TRAIN_IMAGE,  # the in-pod trainer needs CUDA
        "exec-train-2": CPU_IMAGE,  # the job follower does not
        "exec-export": CPU_IMAGE,
        "exec-evaluate": CPU_IMAGE,
        "exec-champion": CPU_IMAGE,
        "exec-gate": CPU_IMAGE,
        "exec-promote": CPU_IMAGE,
        "exec-promote-2": CPU_IMAGE,
    }
    for k, v in ex.items():
        assert "pip install" not in " ".join(v["container"]["command"]), f"{k} installs packages at run time"
        res = v["container"]["resources"]
        assert res.get("cpuLimit") and res.get("memoryLimit"), k
    acc = ex["exec-train"]["container"]["resources"]["accelerator"]
    assert acc["resourceType"] == "nvidia.com/gpu"
    assert acc["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
    assert "accelerator" not in ex["exec-train-2"]["container"]["resources"]


def test_kubernetes_platform_spec(compiled):
    _, spec, platform = compiled
    ex = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(ex) == set(_executors(compiled))
    inline = ex["exec-train"]
    assert inline["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}}
    assert inline["tolerations"] == [{"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}]
    assert inline["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi", "volumeName": "dshm"}]
    assert inline["podMetadata"]["labels"] == {
        "app.kubernetes.io/part-of": "m3i",
        "app.kubernetes.io/component": "train",
        "m3i.io/launcher": "inline",
    }
    assert "nodeSelector" not in ex["exec-train-2"] and "tolerations" not in ex["exec-train-2"]
    for name, e in ex.items():
        assert int(e["activeDeadlineSeconds"]) > 0, name
        (cm,) = e["configMapAsVolume"]
        assert cm["configMapName"] == "m3i-launch" and cm["mountPath"] == "/etc/m3i" and cm["optional"] is True
        assert e["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "m3i"
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}
    assert defaults["gpu_tolerations"]["defaultValue"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Retries: the steps that may meet a flaky node or storage; train resumes from its checkpoint.
    tasks = _all_tasks(spec)
    for name in ("shard", "train", "train-2", "export", "evaluate"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 2, name


def test_version_name_comes_from_package_version_and_revision(tmp_path):
    pkg = tmp_path / "p.yaml"
    pkg.write_text("a: 1\n")
    assert version_name(pkg, "0123456789abcdef0123") == "0.1.0-0123456789ab"
    dirty = version_name(pkg, "0123456789abcdef0123+uncommitted")
    assert dirty.startswith("0.1.0-0123456789ab-") and len(dirty.split("-")[-1]) == 8
    assert version_name(pkg, "unknown").startswith("0.1.0-unknown-")
    pkg.write_text("a: 2\n")
    assert version_name(pkg, "unknown") != dirty


# -- steps -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, str]:
    return small_demo(tmp_path_factory.mktemp("raw"))


def _sources(paths: dict[str, str]) -> dict[str, list[str]]:
    return {"labelled": [paths["labelled"]], "captions": [paths["captions"]], "unlabelled": [paths["unlabelled"]], "eval_labelled": [paths["eval"]]}


SHARD_SETS = ["shard.max_samples_per_shard=16", "shard.workers=1"]


def test_plan_is_content_addressed_and_notices_changes(raw, tmp_path):
    store = str(tmp_path / "store")
    a = plan_dataset(_sources(raw), store, overrides=SHARD_SETS)
    b = plan_dataset(_sources(raw), store, overrides=SHARD_SETS)
    assert a["dataset_uri"] == b["dataset_uri"] == f"{store}/datasets/{a['listing_sha256'][:16]}"
    assert a["complete"] is False and a["cache_key"].startswith(a["listing_sha256"] + "-rebuild-")
    assert a["cache_key"] != b["cache_key"]  # nothing there yet: never a cache hit
    assert a["inputs"] == SMALL.labelled + SMALL.unlabelled + SMALL.eval + SMALL.captioned + 1  # + the caption file
    other = plan_dataset(_sources(raw), store, overrides=[*SHARD_SETS, "shard.jpeg_quality=80"])
    assert other["listing_sha256"] != a["listing_sha256"]  # settings are part of the key
    img = next(Path(raw["unlabelled"]).iterdir())
    data = img.read_bytes()
    try:
        img.write_bytes(data + b"\0")
        assert plan_dataset(_sources(raw), store, overrides=SHARD_SETS)["listing_sha256"] != a["listing_sha256"]
    finally:
        img.write_bytes(data)


def test_shard_then_plan_hits_until_objects_vanish(raw, tmp_path):
    store = str(tmp_path / "store")
    p = plan_dataset(_sources(raw), store, overrides=SHARD_SETS)
    m = shard_dataset(_sources(raw), p["dataset_uri"], overrides=SHARD_SETS)
    assert m["uri"] == p["dataset_uri"]
    assert m["samples"] == SMALL.labelled + SMALL.captioned + SMALL.unlabelled + SMALL.eval
    assert m["splits"]["eval"]["samples"] == SMALL.eval
    assert m["index_sha256"] == open_store(p["dataset_uri"]).sha256("index.json")
    hit = plan_dataset(_sources(raw), store, overrides=SHARD_SETS)
    assert hit["complete"] is True and hit["cache_key"] == hit["listing_sha256"]
    assert plan_dataset(_sources(raw), store, overrides=SHARD_SETS)["cache_key"] == hit["cache_key"]
    # A cached output whose objects are gone is detected: the key changes, so the step reruns.
    ds = open_store(p["dataset_uri"])
    victim = next(o.key for o in ds.list("train/"))
    ds.delete(victim)
    ok, why = verify_dataset(p["dataset_uri"])
    assert not ok and victim in why
    miss = plan_dataset(_sources(raw), store, overrides=SHARD_SETS)
    assert miss["complete"] is False and miss["cache_key"] != hit["cache_key"]
    shard_dataset(_sources(raw), p["dataset_uri"], overrides=SHARD_SETS)
    assert verify_dataset(p["dataset_uri"])[0]


def test_plan_rejects_missing_and_empty_sources(raw, tmp_path):
    with pytest.raises(ValueError, match="no raw inputs"):
        plan_dataset({}, str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        list_sources({"labelled": [str(tmp_path / "nope")]})
    with pytest.raises(ValueError, match="allowed kinds"):
        plan_dataset({"images": [raw["labelled"]]}, str(tmp_path))


@pytest.mark.s3
def test_s3_sources_are_listed_staged_and_sharded(raw, s3_bucket, tmp_path):
    prefix = f"{s3_bucket}/raw"
    store = open_store(prefix)
    base = Path(raw["labelled"]).parent
    for p in base.rglob("*"):
        if p.is_file():
            store.put_file(p.relative_to(base).as_posix(), str(p))
    rel = {k: Path(v).relative_to(base).as_posix() for k, v in raw.items() if k in ("labelled", "captions", "unlabelled", "eval")}
    sources = {
        "labelled": [f"{prefix}/{rel['labelled']}"],
        "captions": [f"{prefix}/{rel['captions']}"],
        "unlabelled": [f"{prefix}/{rel['unlabelled']}"],
        "eval_labelled": [f"{prefix}/{rel['eval']}"],
    }
    rows = list_sources(sources)
    assert all(r.split("\t")[4] for r in rows)  # S3 listings carry ETags
    staged = stage_sources(sources, tmp_path / "stage")
    assert Path(staged["captions"][0]).is_file() and Path(staged["labelled"][0]).is_dir()
    p = plan_dataset(sources, f"{s3_bucket}/m3i", overrides=SHARD_SETS)
    m = shard_dataset(sources, p["dataset_uri"], overrides=SHARD_SETS)
    assert m["samples"] == SMALL.labelled + SMALL.captioned + SMALL.unlabelled + SMALL.eval
    assert plan_dataset(sources, f"{s3_bucket}/m3i", overrides=SHARD_SETS)["complete"] is True


def test_cluster_config_file_comes_before_step_overrides(tmp_path, monkeypatch):
    from m3i.config import load_config
    from m3i.pipeline.steps import step_config

    f = tmp_path / "m3i.yaml"
    f.write_text("launch:\n  namespace: ml\n  node_selector: {pool: gpu}\n  tolerations: ['nvidia.com/gpu:NoSchedule']\ndata:\n  batch_size: 7\n")
    assert config_overrides_from_file(f) == [
        'launch.namespace="ml"',
        'launch.node_selector={"pool": "gpu"}',
        'launch.tolerations=["nvidia.com/gpu:NoSchedule"]',
        "data.batch_size=7",
    ]
    monkeypatch.setenv("M3I_CONFIG", str(f))
    cfg, full = step_config("demo", ["data.batch_size=9"])
    assert cfg.launch.namespace == "ml" and cfg.launch.node_selector == {"pool": "gpu"}
    assert cfg.data.batch_size == 9 and full[-1] == "data.batch_size=9"
    monkeypatch.setenv("M3I_CONFIG", str(tmp_path / "absent.yaml"))  # the ConfigMap is optional
    assert step_config("demo", [])[0].data.batch_size == load_config("demo").data.batch_size
    f.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match=r"m3i.yaml: line 1, column 1: the top level is a list; a config file must be a mapping"):
        config_overrides_from_file(f)
    f.write_text("data:\n  batch_size: [1,\n")
    with pytest.raises(ValueError, match=r"m3i.yaml: line 3, column 1: .*expected"):
        config_overrides_from_file(f)


def test_train_model_rejects_bad_launch_arguments(tmp_path):
    with pytest.raises(ValueError, match="launcher='slurm'"):
        train_model("d", "o", launcher="slurm")
    with pytest.raises(ValueError, match=r"nodes=2 needs a job launcher, one of \['volcano', 'pytorchjob', 'trainjob'\]"):
        train_model("d", "o", launcher="inline", nodes=2)
    with pytest.raises(ValueError, match="run name"):
        run_uri("s3://b", "runs", "../escape")
    assert run_uri("s3://b/x", "runs", "r-1") == "s3://b/x/runs/r-1"
    assert run_uri("s3://b/x", "models") == "s3://b/x/models"


def test_every_job_launcher_is_a_kind_run_cluster_job_follows():
    from m3i.launch.watch import JOB_KINDS

    assert LAUNCHERS[0] == "inline" and set(LAUNCHERS[1:]) == set(JOB_KINDS)
    assert "trainjob" in LAUNCHERS


JOB_CRDS = {"volcano": "batch.volcano.sh_jobs.yaml", "pytorchjob": "kubeflow.org_pytorchjobs.yaml",
            "trainjob": "trainer.kubeflow.org_trainjobs.yaml"}


@pytest.mark.parametrize("launcher", ["volcano", "pytorchjob", "trainjob"])
def test_train_model_sends_a_job_with_every_setting(monkeypatch, tmp_path, launcher):
    """The job branch: the job of that kind gets the pipeline's arguments as --set and the GPU placement."""
    import m3i.launch.watch as watch
    from m3i.launch import LaunchResult, render
    from tests.k8s_schema import assert_valid

    seen = {}

    def fake_run(cfg, train_args, **kw):
        seen["cfg"], seen["args"] = cfg, train_args
        open_store(str(tmp_path / "run")).write_json(
            "summary.json",
            {"run_id": "r1", "resumed_from": None, "checkpoint": "ck", "steps": 5, "samples": 10, "skipped_steps": 0,
             "world_size": 16, "seconds": 1.0, "last_parts": {"loss": 1.0}},
        )
        return LaunchResult("kubernetes", "SUCCEEDED", handle="m3i:job-1")

    monkeypatch.setattr(watch, "run_cluster_job", fake_run)
    m = train_model(
        "s3://b/datasets/x", str(tmp_path / "run"), launcher=launcher, nodes=2, gpus_per_node=8, zero_stage=2,
        precision="bf16", steps=5, run_id="r1", node_selector={"pool": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], preset="demo",
    )
    cfg, args = seen["cfg"], seen["args"]
    assert (cfg.scheduler, cfg.kind, cfg.nodes, cfg.nproc_per_node, cfg.gpus_per_node) == ("kubernetes", launcher, 2, 8, 8)
    assert cfg.node_selector == {"pool": "h100"} and cfg.tolerations == ("nvidia.com/gpu:NoSchedule",)
    assert_valid(render(cfg, args), JOB_CRDS[launcher])  # what run_cluster_job would create
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    for want in ("data.shards=s3://b/datasets/x", "train.zero_stage=2", "train.precision=bf16", "train.steps=5", "train.run_id=r1"):
        assert want in sets
    assert m["checkpoint"] == "ck" and m["job"] == "m3i:job-1" and m["world_size"] == 16

    def failing(cfg, train_args, **kw):
        return LaunchResult("kubernetes", "FAILED", handle="m3i:job-2")

    monkeypatch.setattr(watch, "run_cluster_job", failing)
    with pytest.raises(RuntimeError, match="training FAILED .*m3i:job-2"):
        train_model("d", str(tmp_path / "run2"), launcher="pytorchjob", nodes=2, preset="demo")


# -- the whole pipeline on this machine ------------------------------------------------------------


@pytest.mark.slow
def test_run_local_end_to_end(tmp_path):
    """kfp.local runs every component: demo data -> shards -> 2-process training -> export -> evaluate."""
    from m3i.pipeline.local import run_local

    r = run_local(
        tmp_path / "w",
        arguments={"steps": 4, "probe_epochs": 5},
        # two processes: the demo preset trains in one, the pipeline must carry any count
        overrides=["checkpoint.interval_steps=2", "data.num_workers=0", "launch.nproc_per_node=2", "data.batch_size=16"],
        demo_size=32,
    )
    assert set(r.manifests) >= {"shard/dataset", "train/checkpoint", "export/model", "evaluate/results"}
    run = r.manifests["train/checkpoint"]
    assert run["steps"] == 4 and run["world_size"] == 2 and run["launcher"] == "inline"
    model = r.manifests["export/model"]
    weights = Path(model["uri"]) / "model.safetensors"
    assert weights.is_file() and model["sha256"] == open_store(model["uri"]).sha256("model.safetensors")
    assert 0.0 <= r.scores["knn_top1"] <= 1.0 and 0.0 <= r.scores["probe_top1"] <= 1.0
    assert r.scores["eval_samples"] > 0
    assert 0.0 <= r.scores["random_init_knn_top1"] <= 1.0 and "probe_gain_top1" in r.scores
    assert Path(r.artifacts["evaluate/report"]).read_text().startswith("#")
    # the HTML page: confusion matrix and the loss curves of the history the export carries, inline
    assert Path(r.artifacts["evaluate/figures"]).read_text().count('src="data:image/png;base64,') == 2
    assert r.storage == str(tmp_path / "w" / "store")
    assert not (tmp_path / "w" / "tmp").exists()  # kfp.local's temp folders are cleaned
    json.dumps(r.manifests)  # manifests are plain JSON


@pytest.mark.slow
def test_run_local_on_the_users_labelled_folder(tmp_path):
    """Given inputs replace the demo data: a labelled folder alone, a held-out share of it, two steps."""
    from m3i.pipeline.local import run_local

    labelled = small_demo(tmp_path / "mine")["labelled"]
    r = run_local(
        tmp_path / "w",
        sources={"labelled": [labelled]},
        arguments={"steps": 2, "probe_epochs": 5, "eval_fraction": 0.25},
        overrides=["checkpoint.interval_steps=2", "data.num_workers=0", "launch.nproc_per_node=1", "data.batch_size=16"],
    )
    assert not (tmp_path / "w" / "raw").exists()  # no demo data written
    data = r.manifests["shard/dataset"]
    assert set(k for k, v in data["sources"].items() if v) == {"labelled"}
    assert data["splits"]["eval"]["samples"] > 0
    assert r.manifests["train/checkpoint"]["steps"] == 2
    assert r.scores["eval_samples"] == data["splits"]["eval"]["samples"]


def test_run_local_takes_the_shard_input_flags(monkeypatch, tmp_path, capsys):
    import m3i.pipeline.local as local
    from m3i.cli import main

    seen = {}

    def fake(*a, **kw):
        seen.update(kw)
        return local.LocalRun(tmp_path, str(tmp_path / "store"), tmp_path / "kfp", 1.0)

    monkeypatch.setattr(local, "run_local", fake)
    argv = ["pipeline", "run-local", "--workdir", str(tmp_path), "--labelled", "a", "--labelled", "b", "--captions", "c.jsonl"]
    assert main([*argv, "--unlabelled", "u", "--eval-labelled", "e", "--webdataset", "w/{0..1}.tar", "--eval-fraction", "0.2"]) == 0
    assert seen["sources"] == {
        "labelled": ["a", "b"], "captions": ["c.jsonl"], "unlabelled": ["u"], "eval_labelled": ["e"], "webdataset": ["w/{0..1}.tar"]
    }
    assert seen["arguments"] == {"eval_fraction": 0.2}
    assert "your data -> shard" in capsys.readouterr().out
    assert main(["pipeline", "run-local", "--workdir", str(tmp_path)]) == 0
    assert seen["sources"] == {} and "demo data -> shard" in capsys.readouterr().out


def test_run_local_rejects_an_unknown_source_kind(tmp_path):
    from m3i.pipeline.local import run_local

    with pytest.raises(ValueError, match=r"sources has kinds \['photos'\]; allowed kinds are"):
        run_local(tmp_path, sources={"photos": ["x"]})


def test_run_local_prints_random_init_against_trained(monkeypatch, tmp_path, capsys):
    """The summary of `m3i pipeline run-local` puts each score next to its random-init baseline."""
    import m3i.pipeline.local as local
    from m3i.cli import main

    score = {"top1": 0.85, "top5": 1.0, "mean_class_top1": 0.85}
    base = {"top1": 0.125, "top5": 0.5, "mean_class_top1": 0.125}
    metrics = {"knn": score, "probe": {**score, "top1": 0.9}, "counts": {"eval": 16}, "random_init": {"knn": base, "probe": base}}
    run = local.LocalRun(tmp_path, str(tmp_path / "store"), tmp_path / "kfp", 1.0, manifests={"evaluate/results": {"metrics": metrics}})
    monkeypatch.setattr(local, "run_local", lambda *a, **kw: run)
    assert main(["pipeline", "run-local", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1: random init 12.5 % -> trained 85.0 % (+72.5)" in out
    assert "linear probe top-1: random init 12.5 % -> trained 90.0 % (+77.5)" in out
    assert "on 16 held-out images" in out


def test_evaluate_step_exposes_the_figures_as_html(compiled):
    """The evaluate component's outputs: Metrics, ClassificationMetrics, the Markdown report, the HTML figures."""
    _, spec, _ = compiled
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    kinds = {name: o["artifactType"]["schemaTitle"] for name, o in outputs.items()}
    assert kinds == {
        "metrics": "system.Metrics", "confusion": "system.ClassificationMetrics", "report": "system.Markdown",
        "figures": "system.HTML", "results": "system.Artifact",
    }


def test_pyproject_lists_every_package():
    """Packages are listed (components/ installs as m3i_components): a new sub-package must be added."""
    import tomllib

    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"m3i_components": "components"}
    found = set(find_packages(str(ROOT), include=["m3i", "m3i.*"])) | {"m3i_components"}
    assert set(cfg["packages"]) == found
    assert (ROOT / "components" / "__init__.py").exists()
