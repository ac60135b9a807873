"""What each step of the ``m3i-pretrain`` pipeline does; the KFP components in ``components/`` call these.

    plan   = plan_dataset(sources, "s3://m3i", preset="default")    # never cached
    data   = shard_dataset(sources, plan["dataset_uri"], ...)       # cached on plan["cache_key"]
    run    = train_model(data["uri"], "s3://m3i/runs/r1", launcher="volcano", ...)
    model  = export_model(run["checkpoint"], "s3://m3i/models", ...)
    scores = evaluate_model(model["uri"], data["uri"], "s3://m3i/evals/r1", ...)

Each returns a small JSON-able manifest (URIs, counts, sha256); the bytes stay in object
storage. Config comes from the named preset, then the file named by ``M3I_CONFIG`` when it
exists (the cluster's ``m3i-launch`` ConfigMap, mounted by the pipeline), then the step's
``overrides`` (``section.key=value``), then the step's own arguments as typed values
(:func:`m3i.config.load_config` ``values=``), in that order. Only the train step turns them into
``--set`` text, for the training processes or pods it starts.

Storage layout under the pipeline's ``storage_uri``:

    datasets/<digest16>/    shards + index.json; digest of the input listing and shard settings
    runs/<run>/             checkpoints, summary.json (one per pipeline run)
    models/<name>/<version> exported backbone (m3i export)
    evals/<run>/            metrics.json, report.md, confusion matrix, loss curves (m3i evaluate)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence, TextIO


from m3i.artifacts.dataset import INDEX_KEY, read_index, shard_problems
from m3i.artifacts.export import WEIGHTS
from m3i.artifacts.run import read_summary
from m3i.config import Config, command_line, load_config, to_dict, with_values
from m3i.config.data import INPUT_KINDS, input_values
from m3i.config.launch import KINDS
from m3i.storage import is_remote, join_uri, open_store
from m3i.storage.base import ObjectInfo

__all__ = [
    "SOURCE_KINDS",
    "LAUNCHERS",
    "run_uri",
    "config_overrides_from_file",
    "step_config",
    "list_sources",
    "plan_dataset",
    "verify_dataset",
    "stage_sources",
    "shard_dataset",
    "train_model",
    "export_model",
    "evaluate_model",
]

log = logging.getLogger(__name__)

SOURCE_KINDS = INPUT_KINDS
"""Kinds of raw input, as the pipeline's parameters and ``shard.*`` name them."""

LAUNCHERS = ("inline", *KINDS)
"""``inline``: torchrun inside the train step's own pod (one node); else a Kubernetes job of that
``launch.kind`` (``volcano``, ``pytorchjob``, ``trainjob``), which the step submits, follows and deletes."""

CONFIG_ENV = "M3I_CONFIG"


def config_overrides_from_file(path: str | os.PathLike) -> list[str]:
    """A YAML file of config sections as ``section.key=<json>`` overrides (what a job's pods can be given)."""
    from m3i.config.core import read_yaml_sections

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    doc = read_yaml_sections(text, str(path))  # one line naming file, line and column on any YAML error
    out = []
    for section, values in doc.items():
        out += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items()]
    return out


def run_uri(storage_uri: str, kind: str, run: str = "") -> str:
    """``<storage_uri>/<kind>[/<run>]``: where a pipeline run's outputs of one kind go.

    Raises:
        ValueError: ``run`` is not a plain name (letters, digits, ``-_.``; no slashes).
    """
    if run and (not all(c.isalnum() or c in "-_." for c in run) or run.startswith(".")):
        raise ValueError(f"run name {run!r} must be letters, digits, '-', '_' or '.', not starting with '.'")
    return join_uri(storage_uri, kind, run) if run else join_uri(storage_uri, kind)


def _toleration_spec(t: dict[str, Any] | str) -> str:
    """A Kubernetes toleration dict as ``launch.tolerations`` spells it: ``key[=value][:Effect]``."""
    if isinstance(t, str):
        return t
    if not t.get("key"):
        raise ValueError(f"toleration {t!r} has no key; a job's tolerations need one")
    spec = t["key"] + (f"={t['value']}" if t.get("value") and t.get("operator", "Equal") == "Equal" else "")
    return spec + (f":{t['effect']}" if t.get("effect") else "")


def _cluster_overrides() -> list[str]:
    path = os.environ.get(CONFIG_ENV, "")
    return config_overrides_from_file(path) if path and os.path.exists(path) else []


def step_config(preset: str, overrides: Sequence[str] = (), values: dict[str, Any] | None = None) -> tuple[Config, list[str]]:
    """The config of a step (``values``, the step's own arguments, set last) and the full list of
    text overrides it came from (the cluster file's first)."""
    full = [*_cluster_overrides(), *overrides]
    return load_config(preset or None, None, full, values), full


def _roots(sources: dict[str, Sequence[str]]) -> list[tuple[str, str, str]]:
    """``(kind, given, root)``: the folder whose objects make up each source (for a caption file, its folder)."""
    from m3i.shard.tars import expand

    out = []
    for kind in SOURCE_KINDS:
        for given in sources.get(kind) or []:
            if kind == "webdataset":
                # One entry per tar a pattern names; its root is the tar's folder.
                for url in expand((given,)):
                    out.append((kind, url, url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).resolve().parent)))
                continue
            if kind == "captions":
                root = given.rsplit("/", 1)[0] if is_remote(given) else str(Path(given).resolve().parent)
            else:
                root = given if is_remote(given) else str(Path(given).resolve())
            out.append((kind, given, root))
    return out


def _members(kind: str, given: str, root: str) -> list[ObjectInfo]:
    """The objects of one source, relative to ``root``: every object of a folder; a caption
    file and the images its rows name (from one listing of its folder, not a request per image).

    Raises:
        ValueError: A local source does not exist, or a source lists no objects.
    """
    from m3i.shard.captions import caption_rows

    if not is_remote(given) and not os.path.exists(given):
        raise ValueError(f"{kind} source {given!r} does not exist")
    store = open_store(root)
    if kind == "webdataset":
        name = given.rsplit("/", 1)[-1]
        info = store.stat(name)
        if info is None:
            raise ValueError(f"{kind} source {given!r} does not exist")
        return [info]
    if kind != "captions":
        found = list(store.list())
    else:
        name = given.rsplit("/", 1)[-1] if is_remote(given) else Path(given).name
        with tempfile.TemporaryDirectory(prefix="m3i-captions-") as tmp:
            local = Path(tmp) / name
            if is_remote(given):
                store.get_file(name, str(local))
            else:
                shutil.copyfile(given, local)
            rows = caption_rows(local)
        wanted = {name}
        for _line, row, _err in rows:
            image = (row or {}).get("image")
            if isinstance(image, str) and image:
                wanted.add(posixpath.normpath(image.replace("\\", "/")))
        found = [o for o in store.list() if o.key in wanted]
    if not found:
        raise ValueError(f"{kind} source {given!r} lists no objects")
    return found


def list_sources(sources: dict[str, Sequence[str]]) -> list[str]:
    """One line ``kind<TAB>given<TAB>key<TAB>size<TAB>etag`` per raw input object, sorted.

    Reads listings (and caption files), never image bytes.

    Raises:
        ValueError: A named local source does not exist, or no source is given.
    """
    roots = _roots(sources)
    if not roots:
        raise ValueError(f"no raw inputs: give at least one of {list(SOURCE_KINDS)}")
    rows = []
    for kind, given, root in roots:
        rows += [f"{kind}\t{given}\t{o.key}\t{o.size}\t{o.etag or ''}" for o in _members(kind, given, root)]
    return sorted(rows)


def verify_dataset(uri: str) -> tuple[bool, str]:
    """Whether the data set at ``uri`` is complete: ``index.json`` and every shard it names, at its size."""
    store = open_store(uri)
    try:
        index = read_index(store)
    except Exception as e:  # noqa: BLE001 - missing or unreadable: either way it must be rebuilt
        return False, f"no readable {INDEX_KEY} ({type(e).__name__})"
    have = {o.key: o.size for o in store.list()}
    for split in sorted(index.splits):
        for key, problem in shard_problems(index.shards(split), have):
            return False, f"shard {key} of split {split} is missing" if problem == "missing" else f"shard {key} has {problem}"
    return True, f"index and {sum(len(s) for s in index.splits.values())} shards present"


def plan_dataset(
    sources: dict[str, Sequence[str]], storage_uri: str, *, preset: str = "", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Where the shards of these inputs go, and the key the shard step is cached on.

    The data set's place is content-addressed: ``<storage_uri>/datasets/<digest16>``, the
    digest of the input listing and the shard settings. ``cache_key`` is the digest while
    that data set is complete in storage; when it is missing or damaged (a cached KFP output
    whose objects are gone) the key gets a fresh suffix, so the shard step runs again instead
    of serving the stale cache entry.
    """
    cfg, _ = step_config(preset, overrides, input_values(sources))
    settings = {k: v for k, v in to_dict(cfg.shard).items() if k not in ("out", "workers", *SOURCE_KINDS)}
    rows = list_sources(sources)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in rows:
        h.update(r.encode() + b"\n")
    digest = h.hexdigest()
    dataset_uri = join_uri(storage_uri, "datasets", digest[:16])
    ok, why = verify_dataset(dataset_uri)
    cache_key = digest if ok else f"{digest}-rebuild-{time.time_ns()}"
    return {
        "dataset_uri": dataset_uri,
        "listing_sha256": digest,
        "cache_key": cache_key,
        "inputs": len(rows),
        "input_bytes": sum(int(r.split("\t")[3]) for r in rows),
        "complete": ok,
        "reason": why,
    }


def stage_sources(sources: dict[str, Sequence[str]], scratch: str | os.PathLike) -> dict[str, list[str]]:
    """Local copies of ``s3://`` sources under ``scratch``; local sources pass through unchanged.

    ``m3i shard`` reads files; a step on a cluster gets its raw images from object storage.
    A caption file is copied with the images its rows name. WebDataset tars are read where
    they are (``m3i shard`` streams them), so their patterns pass through too.
    """
    out: dict[str, list[str]] = {k: [] for k in SOURCE_KINDS}
    out["webdataset"] = [str(Path(g).resolve()) if not is_remote(g) else g for g in sources.get("webdataset") or []]
    for i, (kind, given, root) in enumerate(_roots(sources)):
        if kind == "webdataset":
            continue
        if not is_remote(given):
            out[kind].append(given)
            continue
        dest = Path(scratch) / f"{i:03d}-{kind}"
        store = open_store(root)
        members = _members(kind, given, root)
        for info in members:
            target = dest / info.key
            target.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(info.key, str(target))
        log.info("staged %d objects of %s into %s", len(members), given, dest)
        out[kind].append(str(dest / given.rsplit("/", 1)[1]) if kind == "captions" else str(dest))
    return out


def shard_dataset(
    sources: dict[str, Sequence[str]], dataset_uri: str, *, preset: str = "", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Shard the raw inputs into ``dataset_uri``; idempotent (a complete data set is reused unit by unit)."""
    from m3i.shard import shard

    with tempfile.TemporaryDirectory(prefix="m3i-stage-") as scratch:
        local = stage_sources(sources, scratch)
        cfg, _ = step_config(preset, overrides, {**input_values(local), "shard.out": dataset_uri})
        index = shard(cfg.shard, progress=False)
    raw = index.raw
    store = open_store(dataset_uri)
    return {
        "uri": dataset_uri,
        "index": join_uri(dataset_uri, INDEX_KEY),
        "index_sha256": store.sha256(INDEX_KEY),
        "inputs_sha256": raw["inputs_sha256"],
        "classes": list(index.classes),
        "samples": raw["totals"]["samples"],
        "splits": {k: {"samples": v["samples"], "shards": len(v["shards"])} for k, v in raw["splits"].items()},
        "sources": raw["totals"]["sources"],
        "bad_inputs": raw["bad"]["count"],
    }


def train_model(
    dataset_uri: str,
    output_uri: str,
    *,
    launcher: str = "inline",
    nodes: int = 1,
    gpus_per_node: int = 0,
    zero_stage: int = -1,
    precision: str = "",
    backbone: str = "",
    steps: int = 0,
    run_id: str = "",
    node_selector: dict[str, str] | None = None,
    tolerations: Sequence[dict[str, Any] | str] = (),
    preset: str = "",
    overrides: Sequence[str] = (),
    log_to: TextIO | None = None,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train on ``dataset_uri`` into ``output_uri`` and return the run's summary.

    ``launcher``: ``inline`` runs ``nodes == 1`` torchrun agent in this process's machine
    (the step's pod on a cluster; 2 CPU processes in a local run) through torchx;
    ``volcano`` / ``pytorchjob`` / ``trainjob`` create that Kubernetes job (a Volcano Job, a
    Training Operator v1 PyTorchJob, a Kubeflow Trainer v2 TrainJob), stream its state and
    logs, wait for it and delete it (:func:`m3i.launch.watch.run_cluster_job`). ``0`` / ``-1`` / ``""`` values keep the preset's. A re-run with the same
    ``output_uri`` resumes from its latest complete checkpoint.

    Raises:
        ValueError: An unknown launcher, or ``inline`` with more than one node.
        RuntimeError: The training job did not succeed.
    """
    from m3i.launch import launch
    from m3i.launch.watch import run_cluster_job

    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is not one of {list(LAUNCHERS)}")
    if nodes < 1:
        raise ValueError(f"nodes={nodes} must be at least 1")
    if launcher == "inline" and nodes != 1:
        raise ValueError(
            f"launcher='inline' trains on the step's own machine; nodes={nodes} needs a job launcher, one of {list(KINDS)}"
        )
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 0")
    # The step's arguments as typed values; 0, -1 and "" keep the preset's.
    values: dict[str, Any] = {"data.shards": dataset_uri, "train.output": output_uri}
    values.update({"train.run_id": run_id} if run_id else {})
    values.update({"train.zero_stage": zero_stage} if zero_stage >= 0 else {})
    values.update({"train.precision": precision} if precision else {})
    values.update({"model.backbone": backbone} if backbone else {})
    values.update({"train.steps": steps} if steps > 0 else {})
    if launcher != "inline":  # where a job's pods go (KFP places the inline step's own pod)
        values.update({"launch.node_selector": dict(node_selector)} if node_selector else {})
        values.update({"launch.tolerations": [_toleration_spec(t) for t in tolerations]} if tolerations else {})
    cfg, full = step_config(preset, overrides, values)
    # One rank per GPU; without GPUs the config's count, or one (launch.nproc_per_node 0 is "one per GPU").
    nproc = gpus_per_node or cfg.launch.nproc_per_node or 1
    lcfg = with_values(cfg.launch, {
        "launch.scheduler": "local_cwd" if launcher == "inline" else "kubernetes",
        "launch.kind": cfg.launch.kind if launcher == "inline" else launcher,
        "launch.nodes": nodes,
        "launch.nproc_per_node": nproc,
        "launch.gpus_per_node": gpus_per_node,
    })
    # The job's pods see neither this step's config file nor its environment: everything rides as
    # --set, the step's typed values as text here, at the process (or pod) boundary.
    train_args = ["--no-progress", *command_line(preset or None, None, full, values)]
    t0 = time.monotonic()
    if launcher == "inline":
        result = launch(lcfg, train_args, log=log_to)
    else:
        result = run_cluster_job(lcfg, train_args, log_to=log_to, poll_s=poll_s, timeout_s=timeout_s)
    if not result.ok:
        raise RuntimeError(f"training {result.state} ({launcher} {result.handle}); its log is above")
    summary = read_summary(output_uri)
    return {
        "uri": output_uri,
        "checkpoint": summary.checkpoint,
        "steps": summary.steps,
        "samples": summary.samples,
        "skipped_steps": summary.skipped_steps,
        "world_size": summary.world_size,
        "seconds": round(time.monotonic() - t0, 1),
        "train_seconds": summary.seconds,
        "last_parts": summary.last_parts,
        "launcher": launcher,
        "job": result.handle,
        "nodes": nodes,
        "nproc_per_node": nproc,
        "gpus_per_node": gpus_per_node,
    }


def export_model(
    checkpoint: str, models_uri: str, *, name: str = "", preset: str = "", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Export ``checkpoint`` (a run output or one checkpoint) as timm weights under ``models_uri``."""
    from m3i.export import export

    values = {"export.checkpoint": checkpoint, "export.out": models_uri, **({"export.name": name} if name else {})}
    cfg, _ = step_config(preset, overrides, values)
    r = export(cfg)
    out = dataclasses.asdict(r)
    out["sha256"] = open_store(r.uri).sha256(WEIGHTS)
    return out


def evaluate_model(
    model_uri: str,
    dataset_uri: str,
    out_uri: str,
    *,
    k: int = 0,
    probe_epochs: int = 0,
    finetune_steps: int = -1,
    preset: str = "",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Score an exported model on the held-out split of ``dataset_uri``; results under ``out_uri``.

    ``k`` (kNN neighbours), ``probe_epochs`` and ``finetune_steps`` override the preset's
    ``evaluate`` section unless 0, 0 and -1.

    Returns:
        ``metrics`` (metrics.json), ``scalars`` (flat, for KFP Metrics, with the random-init
        baseline and the gains), ``confusion`` (``categories`` + ``matrix``), ``report`` (Markdown
        text), ``html`` (one page with the scores and the figures inline: confusion matrix, loss
        curves when the model's history was found) and ``files`` (URIs).
    """
    from m3i.evaluate import evaluate
    from m3i.evaluate.report import kfp_scalars, render_html, render_report

    values: dict[str, Any] = {"evaluate.model": model_uri, "data.shards": dataset_uri, "evaluate.out": out_uri}
    values.update({"evaluate.k": k} if k > 0 else {})
    values.update({"evaluate.probe_epochs": probe_epochs} if probe_epochs > 0 else {})
    values.update({"evaluate.finetune_steps": finetune_steps} if finetune_steps >= 0 else {})
    cfg, _ = step_config(preset, overrides, values)
    r = evaluate(cfg)
    m = r.metrics  # what the files under out_uri were written from: no need to read them back
    return {
        "metrics": m,
        "scalars": kfp_scalars(m),
        "confusion": {"categories": list(m["classes"]), "matrix": m["probe"]["confusion"]},
        "report": render_report(m),
        "html": render_html(m, r.figures),
        "files": dict(r.files),
        "pushed": r.pushed,
    }
