"""The ablation's data, settings and results: every (arm, seed) not done yet trained and scored, results kept.

    ab = run_ablation(cfg, demo_root="m3i-data/abl/raw", variants=["m3i", "cls"], seeds=[0, 1], steps=300,
                      curve_every=100, workdir="m3i-data/ablation")
    ab.results   # one entry per arm and seed, and per seed's random init (see experiments.ablation.arms.run_arm)

The layout under the work folder is in :mod:`experiments.ablation`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from experiments.ablation.arms import RANDOM, VARIANTS, ArmJob, final_step, random_init_entry, run_arm, stage_steps
from m3i.config import Config, to_dict, with_values
from m3i.config.data import input_values

__all__ = ["Ablation", "prepare_data", "run_ablation", "settings_of"]

log = logging.getLogger(__name__)


def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")  # noqa: SIM115 - closed by the caller's with
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def prepare_data(cfg: Config, demo_root: str, workdir: Path, attributes: Sequence[str]) -> tuple[Config, dict[str, str], dict[str, str]]:
    """Shard the demo root's three sources once, build the attribute data sets; returns (run config, sets, data identity).

    Raises:
        ValueError: When the demo root lacks a source, ``attributes.jsonl`` or an attribute.
    """
    from experiments.ablation.attributes import ATTRIBUTES_FILE, attributes_sha256, build_attribute_sets
    from m3i.shard import shard

    root = Path(demo_root).resolve()
    parts = {
        "labelled": root / "labelled", "captions": root / "captions.jsonl", "unlabelled": root / "unlabelled", "eval": root / "eval",
        "attributes": root / ATTRIBUTES_FILE,
    }
    for p in parts.values():
        if not p.exists():
            raise ValueError(f"--demo-root {demo_root!r} has no {p.name}; write the demo data with `m3i demo-data --out {demo_root}`")
    digest = attributes_sha256(root)
    data = workdir / "data" / digest[:12]  # demo roots of other contents get folders of their own
    sets = build_attribute_sets(root, data / "attributes", attributes, cfg.shard)
    out = data / "train"
    inputs = {"labelled": [str(parts["labelled"])], "captions": [str(parts["captions"])], "unlabelled": [str(parts["unlabelled"])],
              "eval_labelled": [str(parts["eval"])]}
    with _locked(data / ".train.lock"):
        index = shard(with_values(cfg.shard, {**input_values(inputs), "shard.out": str(out), "shard.eval_fraction": 0.0}), progress=False)
    identity = {"inputs_sha256": index.raw["inputs_sha256"], "plan_sha256": index.raw["plan_sha256"], "attributes_sha256": digest}
    run_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, shards=str(out)), metrics=dataclasses.replace(cfg.metrics, port=0),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=True),
    )
    return run_cfg, sets, identity


def settings_of(cfg: Config, *, steps: int, curve_every: int, attributes: Sequence[str], data: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(12-hex hash, settings): what makes two ablations' results comparable. Paths, ports and per-arm values are left out."""
    d = to_dict(cfg)
    for volatile in ("launch", "metrics", "checkpoint", "export"):
        d.pop(volatile, None)
    for k in ("out", "labelled", "captions", "unlabelled", "eval_labelled", "workers"):
        d["shard"].pop(k, None)
    for k in ("shards", "seed", "sources"):
        d["data"].pop(k, None)
    for k in ("output", "run_id", "seed", "steps", "init_from", "log_every"):
        d["train"].pop(k, None)
    for k in ("use_img", "use_cls", "use_txt"):
        d["objective"].pop(k, None)
    d["evaluate"] = {k: v for k, v in d["evaluate"].items() if k not in ("model", "out", "pushgateway", "num_workers", "batch_size")}
    settings = {"steps": steps, "curve_every": curve_every, "attributes": list(attributes), "data": data, "config": d}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12], settings


def _save_result(path: Path, key: str, run: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Put ``run`` (if any) under ``key`` in ``path``, replacing an entry of the same variant and seed; return that key's runs.

    Read, merge and atomic replace under an exclusive lock, so ablations of other settings
    sharing the work folder at the same time keep each other's results.
    """
    with _locked(path.with_name(path.name + ".lock")):
        done = json.loads(path.read_text()) if path.exists() else {}
        runs = done.setdefault(key, [])
        if run is not None:
            runs[:] = [r for r in runs if (r["variant"], r["seed"]) != (run["variant"], run["seed"])] + [run]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, path)
    return runs


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Ablation:
    """What :func:`run_ablation` returns."""

    results: list[dict[str, Any]]
    """The entries of these settings, variants and seeds (random-init ones included)."""
    key: str
    """The settings hash: ``<workdir>/runs/<key>`` and the key in ``results.json``."""
    cfg: Config
    """The run config every arm starts from (``data.shards`` is the training data set)."""
    classes: dict[str, list[str]]
    """Class names of each attribute's data set."""
    counts: dict[str, int]
    """Training samples per source."""


def _check(cfg: Config, variants: Sequence[str], seeds: Sequence[int], steps: int, curve_every: int,
           attributes: Sequence[str], jobs: int, threads: int) -> None:
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is not known; choose from {list(VARIANTS)}")
    if steps < 2 or curve_every < 1 or jobs < 1 or threads < 1 or not seeds or not attributes:
        raise ValueError(
            f"steps={steps}, curve_every={curve_every}, jobs={jobs}, threads={threads}, seeds={list(seeds)}, attributes={list(attributes)}; "
            "need steps >= 2, curve_every >= 1, jobs >= 1, threads >= 1, a seed and an attribute"
        )
    shortest = min(min(stage_steps(v, steps)) for v in variants)
    if cfg.train.warmup_steps >= shortest:
        raise ValueError(
            f"train.warmup_steps={cfg.train.warmup_steps} is not below {shortest}, the shortest stage of --steps {steps}; "
            "every stage warms up on its own: allowed warmup_steps < steps // 2 with two_stage, < steps without"
        )


def run_ablation(
    cfg: Config, *, demo_root: str, variants: Sequence[str], seeds: Sequence[int], steps: int, curve_every: int,
    workdir: str, attributes: Sequence[str] = ("shape", "colour", "position"), jobs: int = 1, threads: int = 1,
) -> Ablation:
    """Train and score every (arm, seed) not done yet under ``workdir``; return all results of these settings.

    Raises:
        ValueError: On an unknown variant, bad counts, or a demo root that lacks what the ablation reads.
        RuntimeError: When an arm's ``m3i train`` fails (the other arms' results are kept).
    """
    from m3i.evaluate import read_split_index

    _check(cfg, variants, seeds, steps, curve_every, attributes, jobs, threads)
    work = Path(workdir).resolve()
    run_cfg, sets, identity = prepare_data(cfg, demo_root, work, attributes)
    key, settings = settings_of(run_cfg, steps=steps, curve_every=curve_every, attributes=attributes, data=identity)
    root = work / "runs" / key
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / "settings.json", json.dumps(settings, indent=1, sort_keys=True))
    import yaml

    config = root / "config.yaml"
    _write_atomic(config, yaml.safe_dump(to_dict(run_cfg), sort_keys=False))
    path = work / "results.json"
    mine = _save_result(path, key, None)

    def have(v: str, s: int) -> dict[str, Any] | None:
        return next((r for r in mine if (r["variant"], r["seed"]) == (v, s)), None)

    def record(r: dict[str, Any]) -> None:
        mine[:] = _save_result(path, key, r)
        last = {a: c[-1] for a, c in r["curve"].items()}
        log.info(
            "%-11s seed %d: %s (%.0fs)", r["variant"], r["seed"],
            ", ".join(f"{a} kNN {100 * p['knn_top1']:.1f}% probe {100 * p['probe_top1']:.1f}%" for a, p in last.items()),
            r["train_seconds"] + r["eval_seconds"],
        )

    for s in seeds:
        if have(RANDOM, s) is None:
            record(random_init_entry(run_cfg, s, sets, threads))
    todo = []
    for s in seeds:
        start = {a: {k: v for k, v in c[0].items() if k != "step"} for a, c in have(RANDOM, s)["curve"].items()}
        for v in variants:
            base = root / f"{v}-s{s}"
            counts = stage_steps(v, steps)
            outputs = (str(base),) if len(counts) == 1 else tuple(str(base / f"stage{i + 1}") for i in range(len(counts)))
            if have(v, s) is not None and all(final_step(o) == n for o, n in zip(outputs, counts)):
                continue
            todo.append(ArmJob(v, s, steps, curve_every, str(config), outputs, sets, run_cfg.evaluate, start, threads))
    log.info("ablation %s: %d arms to run, results in %s", key, len(todo), path)
    _run_jobs(todo, jobs, record, path)
    index = read_split_index(run_cfg.data.shards)
    return Ablation(
        results=[r for r in mine if r["variant"] in (*variants, RANDOM) and r["seed"] in seeds],
        key=key, cfg=run_cfg, classes={a: read_split_index(u).classes for a, u in sets.items()},
        counts=dict(index.raw["splits"]["train"]["sources"]),
    )


def _run_jobs(todo: list[ArmJob], jobs: int, record: Any, path: Path) -> None:
    """Run the arms, ``jobs`` at once (worker processes), handing each result to ``record`` as it comes."""
    if jobs == 1:
        for job in todo:
            record(run_arm(job))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    failed = []
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_arm, job): job for job in todo}
        for fut in as_completed(futures):
            try:
                record(fut.result())
            except Exception as e:  # noqa: BLE001 - the other arms go on; all failures are raised below
                job = futures[fut]
                log.error("%s seed %d failed: %s", job.variant, job.seed, e)
                failed.append(f"{job.variant} seed {job.seed}: {e}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} arms failed (the others are in {path}): " + "\n".join(failed))
