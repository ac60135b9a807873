"""Run the ``m3i-pretrain`` pipeline on this machine with ``kfp.local`` (no cluster, no GPU).

    result = run_local("m3i-data/pipeline")      # demo data -> shards -> train -> export -> evaluate -> gate
    result = run_local("w", sources={"labelled": ["photos/"]})   # your own data instead of the demo's
    result.scores, result.promotion, result.artifacts

The gate keeps each model's champion pointer in the run's store (``<workdir>/store/models/<name>``),
so a second run in the same folder is gated against the first's model.

The same compiled components run as subprocesses of this Python (``SubprocessRunner(
use_venv=False)``: m3i is importable here, nothing is pip-installed); kfp.local passes the
artifacts between them and ignores the Kubernetes settings. The train step takes the
``inline`` branch: torchx runs the preset's processes (2 for ``demo``) on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["LocalRun", "run_local", "DEMO_ARGUMENTS"]

DEMO_ARGUMENTS: dict[str, Any] = {
    "preset": "demo",
    "launcher": "inline",
    "gpus_per_node": 0,  # 0: the preset's process count (demo: 2 CPU processes on gloo)
    "zero_stage": -1,  # -1 / "": keep the preset's
    "precision": "",
    "gpu_node_selector": {},
    "gpu_tolerations": [],
    "knn_k": 0,
    "probe_epochs": 0,
    "finetune_steps": -1,
}
"""Pipeline arguments of a local demo run (the defaults are for a GPU node pool)."""


@dataclass
class LocalRun:
    """What a local pipeline run produced."""

    workdir: Path
    storage: str
    """The pipeline's ``storage_uri``: datasets/, runs/, models/, evals/."""
    pipeline_root: Path
    """Where kfp.local keeps each task's artifacts (the small JSON manifests, metrics, report)."""
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)
    """The evaluate step's KFP scalars (``knn_top1``, ``random_init_knn_top1``, ``knn_gain_top1``, ...)."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """``task/output`` -> local path of that artifact."""
    manifests: dict[str, Any] = field(default_factory=dict)
    """``task/output`` -> parsed JSON of the manifest artifacts."""
    run_name: str = ""
    """The run's name: ``runs/<run_name>``, ``evals/<run_name>``."""

    @property
    def promotion(self) -> dict[str, Any]:
        """What the gate decided (``gate/decision``) and, when it was recorded, the event (``promote*/event``)."""
        event = next((v for k, v in sorted(self.manifests.items()) if k.startswith("promote") and k.endswith("/event")), None)
        return {**self.manifests.get("gate/decision", {}), **({"event": event} if event else {})}


def run_local(
    workdir: str | os.PathLike = "m3i-data/pipeline",
    *,
    arguments: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    storage_uri: str | None = None,
    run_name: str = "",
    demo_size: int | None = None,
    sources: dict[str, Sequence[str]] | None = None,
) -> LocalRun:
    """Run the whole pipeline on ``sources``, or on demo data written under ``workdir`` when none is given.

    Args:
        workdir: Everything goes under it: ``raw/`` (demo images), ``store/`` (the pipeline's
            storage), ``kfp/`` (kfp.local's pipeline root), ``tmp/`` (its temp files).
        arguments: Pipeline arguments over :data:`DEMO_ARGUMENTS` (e.g. ``{"steps": 10}``).
        overrides: ``section.key=value`` config overrides for every step.
        storage_uri: Where the steps write (default ``<workdir>/store``; ``s3://...`` works too).
        run_name: Names ``runs/<run_name>`` and ``evals/<run_name>``; reusing it resumes training. Empty:
            a fresh run, ``local-<UTC date-time>`` (as a KFP run gets its run id), so a second run
            trains anew and is gated against the first's model, kept as champion in ``store/``.
        demo_size: Side of the demo images in pixels (default: the demo data's).
        sources: Raw inputs by kind, as ``m3i shard`` takes them: ``labelled``, ``captions``,
            ``unlabelled``, ``eval_labelled`` -> folders / files (local or ``s3://``). Kinds left out
            are empty. When no kind has an entry, the demo data is used.

    Raises:
        RuntimeError: A step failed (kfp.local's log above says which and why).
        ValueError: ``sources`` has a kind other than the four.
    """
    from kfp import local

    from m3i_components.pipeline import m3i_pretrain

    root = Path(workdir).resolve()
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())
    inputs = _inputs(sources, root / "raw", demo_size)
    storage = storage_uri or str(root / "store")
    pipeline_root = root / "kfp"
    tmp = root / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = {
        **DEMO_ARGUMENTS,
        **inputs,
        "storage_uri": storage,
        "run_name": run_name,
        "overrides": list(overrides),
        **(arguments or {}),
    }
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)  # kfp.local leaves temp folders behind: keep them in one we clean
    t0 = time.monotonic()
    before = set(pipeline_root.iterdir()) if pipeline_root.exists() else set()
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
        with warnings.catch_warnings():
            # Expected here: resources, display names and the m3i images mean nothing to kfp.local.
            warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner.*")
            warnings.filterwarnings("ignore", message=r".*custom or non-Python base image.*")
            try:
                m3i_pretrain(**args)
            except RuntimeError as e:
                raise RuntimeError(f"local pipeline run failed: {e}") from e
    finally:
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - t0
    runs = sorted(set(pipeline_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"kfp.local wrote no run under {pipeline_root}")
    result = LocalRun(root, storage, runs[-1], seconds, run_name=run_name)
    _collect(result)
    return result


def _inputs(sources: dict[str, Sequence[str]] | None, raw: Path, demo_size: int | None) -> dict[str, list[str]]:
    """The pipeline's four source arguments: the given ones (local paths made absolute, since the
    steps run in other folders), else demo data written to ``raw``."""
    from m3i.config.data import input_values
    from m3i.storage import is_remote

    # Every kind, the ones not given empty (the one rule of m3i shard's inputs); an unknown kind is refused.
    given = {key.removeprefix("shard."): paths for key, paths in input_values(sources or {}).items()}
    if any(given.values()):
        return {k: [p if is_remote(p) else str(Path(p).expanduser().resolve()) for p in paths] for k, paths in given.items()}
    from m3i.demo import DemoCounts, make_demo_data

    paths = make_demo_data(raw, DemoCounts(**({"size": demo_size} if demo_size else {})))
    return {"labelled": [paths["labelled"]], "captions": [paths["captions"]], "unlabelled": [paths["unlabelled"]], "eval_labelled": [paths["eval"]]}


def _collect(result: LocalRun) -> None:
    """Find each task's artifact files under the run's folder; read the JSON manifests and the scores."""
    for task_dir in sorted(p for p in result.pipeline_root.iterdir() if p.is_dir()):
        for out in sorted(task_dir.iterdir()):
            if out.name == "executor_output.json":
                continue
            path = out if out.is_file() else next((p for p in sorted(out.rglob("*")) if p.is_file()), None)
            if path is None:
                continue
            key = f"{task_dir.name}/{out.name}"
            result.artifacts[key] = str(path)
            try:
                result.manifests[key] = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                pass  # the Markdown and HTML reports
    doc = result.manifests.get("evaluate/results")
    if isinstance(doc, dict) and "metrics" in doc:
        from m3i.evaluate.report import kfp_scalars

        result.scores = kfp_scalars(doc["metrics"])
