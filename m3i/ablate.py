"""``m3i ablate``: does all-in-one beat each part? Equal steps and batch, several seeds, per-attribute kNN and probe.

    m3i demo-data --out m3i-data/abl/raw
    m3i ablate --preset demo --demo-root m3i-data/abl/raw --steps 300 --seeds 0 1 2 --curve-every 100 --jobs 2

Arms (``--variants``, default all of them):

=========== ==================================================================================
m3i         all three branches at once on the mixed stream (labelled + captioned + unlabelled)
img         image->image alone, on the same mixed stream (every sample has an image)
cls         image->category alone, on the labelled source only
txt         image->text alone, on the captioned source only
two_stage   ``img`` on the mixed stream for the first half of the steps, then image->category and
            image->text on the labelled and captioned sources for the second half, started from the
            stage-1 backbone with ``train.init_from`` (fresh heads, optimiser and schedule)
=========== ==================================================================================

A single-branch arm reads only the source its branch learns from, so each of its batches is all
usable samples (the stronger baseline). Every arm and stage is one plain ``m3i train`` process
(``python -m m3i train --config <run config> --set ...``, no launcher: one rank), with
``--threads`` threads, ``--jobs`` arms at once. Each saves a checkpoint every ``--curve-every``
steps; every checkpoint's online backbone is scored, so each arm has a learning curve. Step 0 is
the backbone at random init, seeded as training seeds it (:func:`m3i.evaluate.random_init`), scored
once per seed: the same point starts every arm's curve.

Scores are per attribute of the demo scenes (``--attributes``, default shape, colour and
position; see :mod:`m3i.attributes`): labels say the shape, captions colour, size and position, so
each branch should help with a different attribute. The kNN memory bank and the probe's training
data are the labelled source's images, the held-out eval images are scored.

Layout under ``--workdir``::

    data/<demo>/train/               the training data set (all three sources), sharded from --demo-root
    data/<demo>/attributes/<attr>/   class folders of links by that attribute, and their shards
                                     (<demo>: the first 12 hex digits of attributes.jsonl's SHA-256)
    runs/<settings>/settings.json    what the settings hash names; config.yaml: the run config every arm gets
    runs/<settings>/<arm>-s<seed>/   one m3i train output (two_stage: .../stage1, .../stage2), train.log
    results.json                     {settings: [one entry per arm and seed, and per seed's random init]}

A re-run with the same settings skips every arm whose final checkpoints are complete and whose
results are in ``results.json``; an arm with complete checkpoints but no results is only scored, a
killed one resumes from its last checkpoint. The Markdown report keeps everything from its
``## Notes`` heading on, so hand-written commentary survives a re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from m3i.config import Config, EvaluateConfig, to_dict

__all__ = [
    "RANDOM",
    "VARIANTS",
    "Ablation",
    "ArmJob",
    "Comparison",
    "Stage",
    "Variant",
    "add_ablate_parser",
    "cmd_ablate",
    "compare",
    "curves_png",
    "render_markdown",
    "run_ablation",
    "run_arm",
    "summarise",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One ``m3i train`` run of an arm: which branches train, on which sources."""

    use_img: bool
    use_cls: bool
    use_txt: bool
    sources: tuple[str, ...]

    @property
    def branches(self) -> str:
        return "+".join(b for b, on in zip(("img", "cls", "txt"), (self.use_img, self.use_cls, self.use_txt)) if on)


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation."""

    label: str
    stages: tuple[Stage, ...]
    """Run one after the other, each from the previous one's backbone; the steps are split evenly."""


_ALL = ("labelled", "captioned", "unlabelled")
VARIANTS: dict[str, Variant] = {
    "m3i": Variant("M3I (all three)", (Stage(True, True, True, _ALL),)),
    "img": Variant("image->image", (Stage(True, False, False, _ALL),)),
    "cls": Variant("image->category", (Stage(False, True, False, ("labelled",)),)),
    "txt": Variant("image->text", (Stage(False, False, True, ("captioned",)),)),
    "two_stage": Variant(
        "image, then category+text", (Stage(True, False, False, _ALL), Stage(False, True, True, ("labelled", "captioned")))
    ),
}
RANDOM = "random_init"
"""The ``variant`` of a seed's random-init entry in the results (step 0 of every curve)."""
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Inherited, these would make an arm join the caller's process group or share its port."""


def stage_steps(variant: str, steps: int) -> list[int]:
    """Optimizer steps of each stage of ``variant``: ``steps`` split evenly, the last stage takes the rest."""
    n = len(VARIANTS[variant].stages)
    counts = [steps // n] * n
    counts[-1] += steps - sum(counts)
    return counts


def stage_overrides(stage: Stage, *, seed: int, steps: int, output: str, curve_every: int, init_from: str = "") -> list[str]:
    """``--set`` values of one stage over the run config: branches, sources, seeds, steps, checkpoints."""
    flag = lambda b: "true" if b else "false"  # noqa: E731
    return [
        f"objective.use_img={flag(stage.use_img)}", f"objective.use_cls={flag(stage.use_cls)}",
        f"objective.use_txt={flag(stage.use_txt)}", f"data.sources={json.dumps(list(stage.sources))}",
        f"data.seed={seed}", f"train.seed={seed}", f"train.steps={steps}", f"train.output={output}",
        f"train.init_from={init_from or chr(39) * 2}",  # '' in YAML: the empty string
        f"checkpoint.interval_steps={curve_every}", f"checkpoint.keep_last={steps // curve_every + 2}",
    ]


def _final_step(output: str) -> int | None:
    from m3i.train.checkpoint import find_latest

    ref = find_latest(output)
    return ref.step if ref is not None else None


def _train(config: str, overrides: list[str], output: str, threads: int) -> None:
    """One ``m3i train`` process (one rank, no launcher); its output goes to ``<output>/train.log``."""
    cmd = [sys.executable, "-m", "m3i", "train", "--no-progress", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    Path(output).mkdir(parents=True, exist_ok=True)
    log_path = Path(output) / "train.log"
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"m3i train exited with {rc} for {output}; last lines of {log_path}:\n{tail}")


def _loss_tail(output: str) -> dict[str, float]:
    """Mean loss parts over the last 10 % of a run's steps (from its history.jsonl)."""
    from m3i.train.history import read_history

    by_step = {r["step"]: r for r in read_history(output) if "step" in r}
    rows = [by_step[s] for s in sorted(by_step)][-max(1, len(by_step) // 10) :]
    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    return {k: statistics.fmean(r[k] for r in rows if k in r) for k in keys}


@dataclass(frozen=True)
class ArmJob:
    """Everything one arm and seed needs, picklable for a worker process."""

    variant: str
    seed: int
    steps: int
    curve_every: int
    config: str
    """The run config (YAML) every stage starts from."""
    outputs: tuple[str, ...]
    """``train.output`` of each stage."""
    sets: dict[str, str]
    """``{attribute: shards}`` to score on."""
    evaluate: EvaluateConfig
    start: dict[str, dict[str, Any]]
    """Step-0 scores (this seed's random init) per attribute."""
    threads: int = 1


def run_arm(job: ArmJob) -> dict[str, Any]:
    """Train the arm's stages that have no final checkpoint yet, then score every checkpoint on every attribute.

    Returns:
        The results entry: ``variant``, ``seed``, ``steps``, ``stage_steps``, ``outputs``,
        ``trained_stages``, ``curve`` (``{attribute: [{"step", "knn_top1", "probe_top1", ...}]}``,
        step 0 first, stage-2 steps offset by stage 1's), ``losses`` and timings.

    Raises:
        RuntimeError: When ``m3i train`` fails.
    """
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch

    from m3i.attributes import score_on_attributes
    from m3i.evaluate import load_encoder, read_split_index
    from m3i.storage import open_store
    from m3i.train.checkpoint import PREFIX, list_complete

    torch.set_num_threads(job.threads)
    started, t0 = time.time(), time.monotonic()
    counts = stage_steps(job.variant, job.steps)
    trained, losses = [], {}
    for i, (stage, n, out) in enumerate(zip(VARIANTS[job.variant].stages, counts, job.outputs)):
        if trained and Path(out).exists():  # it started from the previous stage's old backbone
            shutil.rmtree(out)
        if _final_step(out) != n:
            init = job.outputs[i - 1] if i else ""
            _train(job.config, stage_overrides(stage, seed=job.seed, steps=n, output=out, curve_every=job.curve_every, init_from=init), out, job.threads)
            trained.append(i + 1)
        prefix = f"stage{i + 1}_" if len(counts) > 1 else ""
        losses.update({prefix + k: v for k, v in _loss_tail(out).items()})
    t_train = time.monotonic() - t0
    sets = {a: read_split_index(uri) for a, uri in job.sets.items()}
    curve = {a: [{"step": 0, **job.start[a]}] for a in sets}
    offset = 0
    for n, out in zip(counts, job.outputs):
        for ref in list_complete(open_store(out)):
            encoder = load_encoder(f"{out}/{PREFIX}/{ref.tag}")
            for a, scores in score_on_attributes(encoder, sets, job.evaluate).items():
                curve[a].append({"step": offset + ref.step, **scores})
        offset += n
    return {
        "variant": job.variant, "seed": job.seed, "steps": job.steps, "stage_steps": counts, "outputs": list(job.outputs),
        "trained_stages": trained, "curve": curve, "losses": losses, "train_seconds": t_train,
        "eval_seconds": time.monotonic() - t0 - t_train, "started_unix": started, "finished_unix": time.time(),
    }


def random_init_entry(cfg: Config, seed: int, sets: dict[str, str], threads: int = 1) -> dict[str, Any]:
    """Step 0 of a seed: the backbone as ``m3i train`` with ``train.seed=seed`` initialises it, scored on every attribute."""
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch

    from m3i.attributes import score_on_attributes
    from m3i.evaluate import Encoder, random_init, read_split_index
    from m3i.models import create_backbone

    torch.set_num_threads(threads)
    started, t0 = time.time(), time.monotonic()
    encoder = Encoder(module=torch.nn.Identity(), image_size=cfg.data.image_size, build=lambda: create_backbone(cfg), seed=seed)
    encoder.module = random_init(encoder)
    scores = score_on_attributes(encoder, {a: read_split_index(u) for a, u in sets.items()}, cfg.evaluate)
    return {
        "variant": RANDOM, "seed": seed, "steps": 0, "curve": {a: [{"step": 0, **s}] for a, s in scores.items()},
        "train_seconds": 0.0, "eval_seconds": time.monotonic() - t0, "started_unix": started, "finished_unix": time.time(),
    }


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
    from m3i.attributes import ATTRIBUTES_FILE, attributes_sha256, build_attribute_sets
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
    with _locked(data / ".train.lock"):
        index = shard(dataclasses.replace(
            cfg.shard, out=str(out), labelled=(str(parts["labelled"]),), captions=(str(parts["captions"]),),
            unlabelled=(str(parts["unlabelled"]),), eval_labelled=(str(parts["eval"]),), eval_fraction=0.0,
        ), progress=False)
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
            if have(v, s) is not None and all(_final_step(o) == n for o, n in zip(outputs, counts)):
                continue
            todo.append(ArmJob(v, s, steps, curve_every, str(config), outputs, sets, run_cfg.evaluate, start, threads))
    log.info("ablation %s: %d arms to run, results in %s", key, len(todo), path)
    if jobs == 1:
        for job in todo:
            record(run_arm(job))
    else:
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
    index = read_split_index(run_cfg.data.shards)
    return Ablation(
        results=[r for r in mine if r["variant"] in (*variants, RANDOM) and r["seed"] in seeds],
        key=key, cfg=run_cfg, classes={a: read_split_index(u).classes for a, u in sets.items()},
        counts=dict(index.raw["splits"]["train"]["sources"]),
    )


# -- summary and verdict ------------------------------------------------------------------

_T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
"""Two-sided 5 % critical values of Student's t by degrees of freedom (n1 + n2 - 2); 2.0 beyond."""
SCORES = (("knn_top1", "kNN"), ("probe_top1", "linear probe"))


def final_scores(results: list[dict[str, Any]], variant: str, attribute: str, metric: str) -> dict[int, float]:
    """``{seed: score in %}`` of ``variant``'s last curve point on ``attribute``."""
    return {r["seed"]: 100 * r["curve"][attribute][-1][metric] for r in results if r["variant"] == variant and attribute in r["curve"]}


def summarise(results: list[dict[str, Any]], variants: Sequence[str], attributes: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{attribute: {variant: {metric: (mean, sample std), "n": seeds}}}`` of the final scores in % (``feature_std`` as is)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a in attributes:
        for v in (RANDOM, *variants):
            rows = [r["curve"][a][-1] for r in results if r["variant"] == v and a in r["curve"]]
            if rows:
                entry: dict[str, Any] = {m: _mean_std([100 * p[m] for p in rows]) for m, _ in SCORES}
                entry["feature_std"] = _mean_std([p["feature_std"] for p in rows])
                entry["n"] = len(rows)
                out.setdefault(a, {})[v] = entry
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class Comparison:
    """M3I against one other arm on one attribute and score."""

    rival: str
    diff: float
    """Mean of M3I minus the rival's, in points."""
    t: float | None
    """The difference over its standard error from the seeds' sample std; ``None`` with fewer than 2 seeds on a side."""
    crit: float | None
    """Two-sided 5 % critical value of ``|t|`` for ``n1 + n2 - 2`` degrees of freedom."""

    @property
    def reached(self) -> bool:
        return self.diff >= 0

    @property
    def clear(self) -> bool:
        return self.t is not None and self.crit is not None and abs(self.t) > self.crit


def compare(m3i: Sequence[float], rivals: dict[str, Sequence[float]]) -> list[Comparison]:
    """M3I's per-seed scores against each rival's, in the order given.

    Args:
        m3i: M3I's scores, one per seed.
        rivals: ``{arm: its scores, one per seed}``.

    Returns:
        One :class:`Comparison` a rival; ``t = (m1 - m2) / sqrt(s1^2 / n1 + s2^2 / n2)``.
    """
    m1, s1 = _mean_std(list(m3i))
    out = []
    for name, values in rivals.items():
        m2, s2 = _mean_std(list(values))
        n1, n2 = len(m3i), len(values)
        t = crit = None
        if n1 > 1 and n2 > 1:
            se = math.sqrt(s1**2 / n1 + s2**2 / n2)
            t = (m1 - m2) / se if se > 0 else (0.0 if m1 == m2 else math.copysign(math.inf, m1 - m2))
            crit = _T_CRIT.get(n1 + n2 - 2, 2.0)
        out.append(Comparison(name, m1 - m2, t, crit))
    return out


def verdict_line(attribute: str, score: str, comparisons: list[Comparison]) -> str:
    """One Markdown bullet: does M3I reach every other arm on this attribute and score, and how clearly."""
    behind = [c.rival for c in comparisons if not c.reached]
    head = "reaches every other arm" if not behind else "does **not** reach " + ", ".join(f"`{b}`" for b in behind)
    parts = []
    for c in comparisons:
        if c.t is None:
            stat = "t n/a with one seed"
        else:
            stat = f"t = {c.t:.2f}, {'a clear' if c.clear else 'not a clear'} difference (|t| > {c.crit})"
        parts.append(f"`{c.rival}` {c.diff:+.1f} points ({stat})")
    return f"- **{attribute}**, {score}: M3I {head}. Against " + "; ".join(parts) + "."


# -- report ---------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def render_markdown(
    ab: Ablation, *, variants: Sequence[str], seeds: Sequence[int], steps: int, curve_every: int,
    attributes: Sequence[str], command: str, png_name: str, notes: str = "",
) -> str:
    """The report: how it was run, a table per attribute (mean +- std over seeds), the curves, a computed verdict."""
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch

    results, cfg = ab.results, ab.cfg
    s = summarise(results, variants, attributes)
    stamped = [r for r in results if "started_unix" in r]
    t0, t1 = (min(r["started_unix"] for r in stamped), max(r["finished_unix"] for r in stamped)) if stamped else (0.0, 0.0)
    utc = lambda ts: datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)  # noqa: E731
    arms = [r for r in results if r["variant"] != RANDOM]
    run_minutes = sum(r["train_seconds"] + r["eval_seconds"] for r in arms) / 60
    f = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}"  # noqa: E731
    o, t, d, e = cfg.objective, cfg.train, cfg.data, cfg.evaluate

    def arm_text(v: str) -> str:
        stages, counts = VARIANTS[v].stages, stage_steps(v, steps)
        text = ", then ".join(f"{st.branches} on {'/'.join(st.sources)}" + (f" for {n} steps" if len(stages) > 1 else "") for st, n in zip(stages, counts))
        return f"`{v}` {text}" + (" (stage 2 from stage 1's backbone, `train.init_from`)" if len(stages) > 1 else "")

    lines = [
        "# Ablation: does all-in-one beat each part?",
        "",
        f"Generated by `m3i ablate` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"(git {_git_revision()}, python {platform.python_version()}, torch {torch.__version__}, "
        f"{len(os.sched_getaffinity(0))} cores shared with other jobs, load average at the end {os.getloadavg()[0]:.1f}). "
        f"{_plural(len(arms), 'run')} of {run_minutes:.1f} min in all (training and scoring); from the first run's start to the last "
        f"one's end {(t1 - t0) / 60:.1f} min ({utc(t0):%Y-%m-%d %H:%M}-{utc(t1):%H:%M} UTC). Settings hash `{ab.key}`.",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Settings",
        "",
        "- arms: " + "; ".join(arm_text(v) for v in variants) + ". Each arm and stage is one `m3i train` process; "
        "single-branch arms read only the sources their branch learns from, so every sample of their batches counts.",
        "- training data: the demo root's sources, " + ", ".join(f"{n} {src}" for src, n in sorted(ab.counts.items()))
        + f", {d.image_size} px, sharded to `{d.shards}`.",
        "- scored per attribute: " + "; ".join(f"{a} ({len(c)} classes: {', '.join(c)})" for a, c in ab.classes.items())
        + ". kNN memory bank and probe data: the labelled source's images; scored: the held-out eval images.",
        f"- model: `{cfg.model.backbone}`, patch {cfg.model.patch_size}, pooling `{cfg.model.global_pool}`; every arm {steps} "
        f"optimizer steps at batch {d.batch_size} on one process.",
        f"- optimiser: AdamW, peak LR {t.lr:g} x {d.batch_size}/256 = {t.lr * d.batch_size / 256:.2e}, "
        f"{t.warmup_steps} warm-up steps (per stage), cosine to {t.min_lr:g}, weight decay {t.weight_decay:g}, "
        f"betas {tuple(t.betas)}, clip {t.grad_clip:g}.",
        f"- objective: weights img {o.w_img:g} / cls {o.w_cls:g} / txt {o.w_txt:g}, mask ratio {o.mask_ratio:g}, "
        f"mix images {o.mix_images}, EMA m0 {cfg.model.ema_m0:g}; label smoothing {o.label_smoothing:g}.",
        f"- seeds {', '.join(map(str, seeds))} (`train.seed` and `data.seed`: model init and data order); scores: kNN "
        f"(k={e.k}, T={e.knn_temperature:g}, cosine) and a linear probe ({e.probe_epochs} epochs, AdamW {e.probe_lr:g}) on "
        f"frozen online-backbone features, every {curve_every} steps; step 0 is the backbone at random init, seeded as "
        "training seeds it.",
        "",
        "## Results",
        "",
        f"Top-1 accuracy in % after {steps} steps, mean ± sample std over {_plural(len(seeds), 'seed')}; the last column lists the "
        "probe's top-1 per seed.",
    ]
    for a in attributes:
        if a not in s:
            continue
        lines += ["", f"### {a} (chance {100 / len(ab.classes[a]):.1f} %)", "",
                  "| arm | kNN top-1 | probe top-1 | feature std | probe per seed |", "| --- | --- | --- | --- | --- |"]
        for v in (RANDOM, *variants):
            if v in s[a]:
                r = s[a][v]
                per_seed = final_scores(results, v, a, "probe_top1")
                name = "random init (step 0)" if v == RANDOM else f"{VARIANTS[v].label} (`{v}`)"
                lines.append(
                    f"| {name} | {f(r['knn_top1'])} | {f(r['probe_top1'])} | {r['feature_std'][0]:.3f} | "
                    + ", ".join(f"{per_seed[x]:.1f}" if x in per_seed else "-" for x in seeds) + " |"
                )
    lines += ["", f"![linear-probe top-1 against step, one panel per attribute, mean over seeds]({png_name})", "",
              "## Verdict (computed)", "",
              "Does M3I reach at least every other arm? Per attribute and score, M3I's mean minus each arm's, with "
              "t = difference over its standard error from the seeds' std (Welch) and the two-sided 5 % critical value "
              "for n1 + n2 - 2 degrees of freedom.", ""]
    for a in attributes:
        if "m3i" not in s.get(a, {}):
            continue
        for metric, name in SCORES:
            rivals = {v: list(final_scores(results, v, a, metric).values()) for v in variants if v != "m3i" and v in s[a]}
            if rivals:
                lines.append(verdict_line(a, name, compare(list(final_scores(results, "m3i", a, metric).values()), rivals)))
    lines.append("")
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def mean_curves(results: list[dict[str, Any]], variants: Sequence[str], attribute: str, metric: str = "probe_top1") -> dict[str, tuple[list[int], list[float]]]:
    """``{variant: (steps, mean score in % over seeds)}`` of each arm's curve on ``attribute``."""
    out = {}
    for v in variants:
        by_step: dict[int, list[float]] = {}
        for r in results:
            if r["variant"] == v and attribute in r["curve"]:
                for p in r["curve"][attribute]:
                    by_step.setdefault(p["step"], []).append(100 * p[metric])
        if by_step:
            xs = sorted(by_step)
            out[v] = (xs, [statistics.fmean(by_step[x]) for x in xs])
    return out


def curves_png(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], chance: dict[str, float], *, title: str = "") -> bytes:
    """One panel per attribute, one line per arm, a dashed chance line; shared legend on top.

    Args:
        panels: ``{attribute: {arm: (steps, score in %)}}``.
        chance: ``{attribute: chance level in %}``.
        title: Caption above the legend.

    Returns:
        PNG bytes.
    """
    from PIL import Image, ImageDraw

    # The figure helpers of m3i.evaluate.plot, for the same look as the other figures.
    from m3i.evaluate.plot import _PALETTE, _font, _nice_ticks, _png, _text_w, _tick_label

    arms = list(dict.fromkeys(v for p in panels.values() for v in p))
    colour = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(arms)}
    font, small = _font(15), _font(12)
    width, panel_h, gap, left, right = 760, 170, 40, 70, 740
    top0 = 64 if title else 40
    img = Image.new("RGB", (width, top0 + len(panels) * (panel_h + gap) + 20), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((left, 10), title, fill="black", font=font)
    x = left
    for v in arms:  # legend
        draw.line((x, top0 - 16, x + 18, top0 - 16), fill=colour[v], width=3)
        draw.text((x + 22, top0 - 24), v, fill="black", font=small)
        x += 40 + _text_w(draw, v, small)
    xs_all = [x for p in panels.values() for xs, _ in p.values() for x in xs] or [0.0]
    x_lo, x_hi = min(xs_all), max(xs_all)
    x_of = lambda v: left + (right - left) * (v - x_lo) / ((x_hi - x_lo) or 1.0)  # noqa: E731
    for i, (a, lines_) in enumerate(panels.items()):
        top = top0 + i * (panel_h + gap) + 18
        bottom = top + panel_h
        ys = [y for _, yv in lines_.values() for y in yv] + [chance.get(a, 0.0)]
        lo, hi = max(0.0, math.floor(min(ys) / 5) * 5 - 5), min(100.0, math.ceil(max(ys) / 5) * 5 + 5)
        y_of = lambda v: bottom - (bottom - top) * (v - lo) / ((hi - lo) or 1.0)  # noqa: E731, B023
        ticks = _nice_ticks(lo, hi, 4)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for v in ticks:
            draw.line((left, y_of(v), right, y_of(v)), fill=(230, 230, 230))
            label = _tick_label(v, step)
            draw.text((left - 6 - _text_w(draw, label, small), y_of(v) - 7), label, fill="black", font=small)
        draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
        if a in chance:
            for x0 in range(left, right, 12):
                draw.line((x0, y_of(chance[a]), min(x0 + 6, right), y_of(chance[a])), fill=(120, 120, 120))
        for j, (v, (xs, yv)) in enumerate(lines_.items()):
            pts = [(x_of(x), y_of(y)) for x, y in zip(xs, yv)]
            w = 2 + 2 * (len(lines_) - 1 - j)  # earlier arms wider: lines that coincide stay visible
            if len(pts) > 1:
                draw.line(pts, fill=colour[v], width=w)
            for px, py in pts:
                draw.ellipse((px - w / 2 - 2, py - w / 2 - 2, px + w / 2 + 2, py + w / 2 + 2), fill=colour[v])
        draw.text((left, top - 18), f"{a}: linear-probe top-1 %" + (f" (dashed: chance {chance[a]:.1f} %)" if a in chance else ""), fill="black", font=font)
        if i == len(panels) - 1:
            x_ticks = _nice_ticks(x_lo, x_hi, 6, min_step=1.0) if x_hi > x_lo else [x_lo]
            x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
            for v in x_ticks:
                label = _tick_label(v, x_step)
                draw.text((x_of(v) - _text_w(draw, label, small) / 2, bottom + 4), label, fill="black", font=small)
            draw.text((right - _text_w(draw, "step", small), bottom + 18), "step", fill=(90, 90, 90), font=small)
    return _png(img)


# -- command line -----------------------------------------------------------------------------


def cmd_ablate(args: argparse.Namespace, cfg: Config) -> int:
    """The ``m3i ablate`` subcommand (see the module docstring)."""
    ab = run_ablation(
        cfg, demo_root=args.demo_root, variants=args.variants, seeds=args.seeds, steps=args.steps, curve_every=args.curve_every,
        workdir=args.workdir, attributes=args.attributes, jobs=args.jobs, threads=args.threads,
    )
    doc = Path(args.doc)
    png = doc.with_name(f"{doc.stem}_curves.png")
    notes = ""
    if doc.exists():
        text = doc.read_text()
        if "\n## Notes" in text:
            notes = text[text.index("\n## Notes") + 1 :]
    command = shlex.join(["m3i", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("m3i", "__main__.py") else shlex.join(sys.argv)
    doc.parent.mkdir(parents=True, exist_ok=True)
    panels = {a: mean_curves(ab.results, args.variants, a) for a in args.attributes}
    png.write_bytes(curves_png(
        panels, {a: 100 / len(c) for a, c in ab.classes.items()},
        title=f"mean over {_plural(len(args.seeds), 'seed')}; step 0: random init; {args.steps} steps, batch {ab.cfg.data.batch_size}",
    ))
    doc.write_text(render_markdown(
        ab, variants=args.variants, seeds=args.seeds, steps=args.steps, curve_every=args.curve_every,
        attributes=args.attributes, command=command, png_name=png.name, notes=notes,
    ))
    for a, arms in summarise(ab.results, args.variants, args.attributes).items():
        for v, r in arms.items():
            print(f"{a:9s} {v:11s} kNN top-1 {r['knn_top1'][0]:5.1f} ± {r['knn_top1'][1]:4.1f}   probe top-1 {r['probe_top1'][0]:5.1f} ± {r['probe_top1'][1]:4.1f}")
    print(f"wrote {doc} and {png}")
    return 0


def add_ablate_parser(sub: Any, config_args: Any) -> argparse.ArgumentParser:
    """Register ``m3i ablate`` on the CLI's subparsers (``config_args`` adds --preset/--config/--set); returns its parser."""
    p = sub.add_parser("ablate", help="M3I vs each branch alone vs two-stage, equal steps, several seeds, per attribute -> Markdown + PNG")
    config_args(p, "demo")
    p.add_argument("--demo-root", required=True, metavar="DIR", help="`m3i demo-data` output: the sources and attributes.jsonl")
    p.add_argument("--attributes", nargs="+", default=["shape", "colour", "position"], help="attributes scored (default: shape colour position)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per arm, all stages together (default: %(default)s)")
    p.add_argument("--curve-every", type=int, default=100, help="checkpoint and score every this many steps (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="arms to run (default: all)")
    p.add_argument("--workdir", default="m3i-data/ablation", help="data sets, runs and results.json go here (default: %(default)s)")
    p.add_argument("--doc", default="docs/ablation.md", help="Markdown report; <stem>_curves.png goes next to it (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="arms trained at once, one process each (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (default: %(default)s)")
    return p
