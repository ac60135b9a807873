"""The arms of the ablation, and one arm trained (``m3i train`` processes) and scored at every checkpoint.

    job = ArmJob("two_stage", seed=0, steps=300, curve_every=100, config="runs/<key>/config.yaml", outputs=(...), ...)
    entry = run_arm(job)   # {"variant", "seed", "curve": {attribute: [{"step", "knn_top1", "probe_top1", ...}]}, ...}
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3i.config import Config, EvaluateConfig, command_line, override_strings

__all__ = [
    "RANDOM", "VARIANTS", "ArmJob", "Stage", "Variant", "random_init_entry", "run_arm", "stage_overrides", "stage_steps",
]


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
    """``--set`` text of one stage over the run config (branches, sources, seeds, steps, checkpoints), for its ``m3i train`` process."""
    return override_strings({
        "objective.use_img": stage.use_img, "objective.use_cls": stage.use_cls, "objective.use_txt": stage.use_txt,
        "data.sources": stage.sources, "data.seed": seed, "train.seed": seed, "train.steps": steps, "train.output": output,
        "train.init_from": init_from, "checkpoint.interval_steps": curve_every, "checkpoint.keep_last": steps // curve_every + 2,
    })


def final_step(output: str) -> int | None:
    """Step of the latest complete checkpoint under a run output, ``None`` without one."""
    from m3i.artifacts import find_latest

    ref = find_latest(output)
    return ref.step if ref is not None else None


def _train(config: str, overrides: list[str], output: str, threads: int) -> None:
    """One ``m3i train`` process (one rank, no launcher); its output goes to ``<output>/train.log``."""
    cmd = [sys.executable, "-m", "m3i", "train", "--no-progress", *command_line(config_file=config, overrides=overrides)]
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
    from m3i.artifacts import read_history

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
    import torch  # here, not at import time: `--help` needs no torch

    from experiments.ablation.attributes import score_on_attributes
    from m3i.artifacts import PREFIX, list_complete
    from m3i.evaluate import read_split_index
    from m3i.models.pretrained import load_encoder
    from m3i.storage import open_store

    torch.set_num_threads(job.threads)
    started, t0 = time.time(), time.monotonic()
    counts = stage_steps(job.variant, job.steps)
    trained, losses = [], {}
    for i, (stage, n, out) in enumerate(zip(VARIANTS[job.variant].stages, counts, job.outputs)):
        if trained and Path(out).exists():  # it started from the previous stage's old backbone
            shutil.rmtree(out)
        if final_step(out) != n:
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
    import torch  # here, not at import time: `--help` needs no torch

    from experiments.ablation.attributes import score_on_attributes
    from m3i.evaluate import random_init, read_split_index
    from m3i.models import create_backbone
    from m3i.models.pretrained import Encoder

    torch.set_num_threads(threads)
    started, t0 = time.time(), time.monotonic()
    encoder = Encoder(module=torch.nn.Identity(), image_size=cfg.data.image_size, build=lambda: create_backbone(cfg), seed=seed)
    encoder.module = random_init(encoder)
    scores = score_on_attributes(encoder, {a: read_split_index(u) for a, u in sets.items()}, cfg.evaluate)
    return {
        "variant": RANDOM, "seed": seed, "steps": 0, "curve": {a: [{"step": 0, **s}] for a, s in scores.items()},
        "train_seconds": 0.0, "eval_seconds": time.monotonic() - t0, "started_unix": started, "finished_unix": time.time(),
    }
