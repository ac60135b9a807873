"""``m3i ablate``: does all-in-one beat each part? Equal steps and batch, several seeds, kNN and probe.

    m3i ablate --preset demo --set train.lr=8e-3 --set train.warmup_steps=30 --steps 300 --seeds 0 1 2 --jobs 2

Variants (``--variants``, default all of them):

=========== ==================================================================================
m3i         all three branches at once on the mixed stream (labelled + captioned + unlabelled)
img         image->image alone, on the same mixed stream (every sample has an image)
cls         image->category alone, on the labelled source only
txt         image->text alone, on the captioned source only
two_stage   ``img`` for the first half of the steps, then ``cls`` for the second half from the
            stage-1 backbone (a fresh optimiser, schedule and class head; the image branch's
            projector, predictor and EMA target are dropped, as in any SSL -> supervised recipe)
=========== ==================================================================================

A single-branch baseline reads only the source its branch learns from, so each of its
batches is all usable samples; that is the stronger baseline (the mixed stream would hand
``cls`` about 12 labelled samples of 32). Every run is trained in this process by
:func:`train_run`, a single-process loop over the library parts that ``m3i train`` composes
(:class:`~m3i.data.ShardLoader`, the two-view transform, :func:`~m3i.models.build_model`,
AdamW with the same parameter groups, warm-up + cosine schedule, gradient clipping and EMA
momentum schedule) without DeepSpeed, whose ZeRO-0 fp32 single-rank step is the same update.
``m3i train`` has no way to start from another run's backbone, which stage 2 needs.
Then the online backbone is scored with :func:`m3i.evaluate.score_features` (kNN and linear
probe on the ``eval`` split; memory bank and probe data: the labelled ``train`` split).

Results go to ``<workdir>/results.json`` as each run finishes, keyed by the settings (ablations of
other settings may share the folder, even at the same time); a re-run with the same settings
skips the runs already there. The Markdown report keeps everything from its ``## Notes``
heading on, so hand-written commentary survives a re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from m3i.config import Config, to_dict

if TYPE_CHECKING:
    import torch

__all__ = ["VARIANTS", "Variant", "run_ablation", "train_run", "evaluate_backbone", "render_markdown"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation: which branches train, on which sources."""

    label: str
    stages: tuple[tuple[bool, bool, bool, tuple[str, ...]], ...]
    """Per stage ``(use_img, use_cls, use_txt, data sources)``; the steps are split evenly."""


_ALL = ("labelled", "captioned", "unlabelled")
VARIANTS: dict[str, Variant] = {
    "m3i": Variant("M3I (all three)", ((True, True, True, _ALL),)),
    "img": Variant("image->image", ((True, False, False, _ALL),)),
    "cls": Variant("image->category", ((False, True, False, ("labelled",)),)),
    "txt": Variant("image->text", ((False, False, True, ("captioned",)),)),
    "two_stage": Variant("img, then cls", ((True, False, False, _ALL), (False, True, False, ("labelled",)))),
}


def _stage_cfg(cfg: Config, stage: tuple[bool, bool, bool, tuple[str, ...]], steps: int, seed: int) -> Config:
    use_img, use_cls, use_txt, sources = stage
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, sources=sources, seed=seed),
        objective=dataclasses.replace(cfg.objective, use_img=use_img, use_cls=use_cls, use_txt=use_txt),
        train=dataclasses.replace(cfg.train, steps=steps, seed=seed),
    )


def train_run(cfg: Config, init_backbone: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, float]]:
    """Train one stage for ``cfg.train.steps`` steps on one process; returns (model, mean loss parts of the last 10 %).

    The update is ``m3i train``'s on one rank: AdamW over :func:`m3i.train.engine.param_groups`,
    peak LR ``train.lr x batch / 256``, :func:`m3i.train.engine.lr_lambda`, clipping at
    ``train.grad_clip``, and the EMA momentum schedule after every step.

    Args:
        cfg: The stage's config (objective switches, ``data.sources``, ``train.steps``, ``train.seed``).
        init_backbone: A backbone state dict to start from (stage 2), loaded into the online
            encoder and, with the image branch on, its EMA target.
    """
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch
    from m3i.data import ShardLoader
    from m3i.models import build_model, ema_momentum
    from m3i.train.engine import lr_lambda, param_groups, peak_lr
    from m3i.transforms import build_transform

    torch.manual_seed(cfg.train.seed)
    loader = ShardLoader(cfg.data, build_transform(cfg, train=True))
    model = build_model(cfg, num_classes=loader.num_classes)
    if init_backbone is not None:
        model.backbone.load_state_dict(init_backbone)
        if model.use_img:  # the EMA target starts as a copy of the online encoder
            model.target.backbone.load_state_dict(init_backbone)
    model.train()
    peak = peak_lr(cfg, 1)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=peak, betas=tuple(cfg.train.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, peak))
    params = [p for p in model.parameters() if p.requires_grad]
    steps, step, tail = cfg.train.steps, 0, []
    while step < steps:
        for batch in loader:
            parts = model(batch)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
            model.update_ema(ema_momentum(step, steps, cfg.model.ema_m0))
            if step > steps - max(1, steps // 10):
                tail.append({k: float(v.detach()) for k, v in parts.items() if k.startswith("loss")})
            if step >= steps:
                break
    means = {k: statistics.fmean(t[k] for t in tail) for k in tail[0]}
    return model, means


def evaluate_backbone(backbone: torch.nn.Module, cfg: Config) -> dict[str, Any]:
    """kNN and linear-probe scores of a trained online backbone on ``cfg.data.shards`` (``cfg.evaluate``)."""
    from m3i.evaluate import Encoder, eval_transform, extract_features, read_split_index, score_features

    index = read_split_index(cfg.data.shards)
    transform = eval_transform(Encoder(backbone, cfg.data.image_size))
    e = cfg.evaluate
    kw = {"batch_size": e.batch_size, "num_workers": e.num_workers}
    train = extract_features(backbone, index, e.train_split, transform, **kw)
    test = extract_features(backbone, index, e.eval_split, transform, **kw)
    return score_features(train, test, index.classes, e)


def run_one(cfg: Config, variant: str, seed: int, steps: int) -> dict[str, Any]:
    """Train ``variant`` with ``seed`` for ``steps`` steps in all, then score it."""
    t0, started = time.monotonic(), time.time()
    stages = VARIANTS[variant].stages
    counts = [steps // len(stages)] * len(stages)
    counts[-1] += steps - sum(counts)
    backbone, losses = None, {}
    for i, (stage, n) in enumerate(zip(stages, counts)):
        model, tail = train_run(_stage_cfg(cfg, stage, n, seed), backbone)
        backbone = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        losses.update({f"stage{i + 1}_{k}" if len(stages) > 1 else k: v for k, v in tail.items()})
    t_train = time.monotonic() - t0
    scores = evaluate_backbone(model.backbone.eval(), cfg)
    return {
        "variant": variant, "seed": seed, "steps": steps,
        "knn_top1": scores["knn"]["top1"], "knn_top5": scores["knn"]["top5"],
        "probe_top1": scores["probe"]["top1"], "probe_top5": scores["probe"]["top5"],
        "feature_std": scores["feature_std"]["eval"], "losses": losses,
        "train_seconds": t_train, "eval_seconds": time.monotonic() - t0 - t_train,
        "started_unix": started, "finished_unix": time.time(),
    }


def _settings_key(cfg: Config, steps: int) -> str:
    d = to_dict(cfg)
    for volatile in ("launch", "metrics", "checkpoint", "export"):
        d.pop(volatile, None)
    d["evaluate"] = {k: v for k, v in d["evaluate"].items() if k not in ("model", "out", "pushgateway", "num_workers")}
    return json.dumps({"steps": steps, "config": d}, sort_keys=True)


def _save_result(path: Path, key: str, run: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Add ``run`` (if any) under ``key`` in ``path`` and return that key's runs.

    Read, merge and atomic replace under an exclusive lock, so ablations of other settings
    sharing the work folder at the same time keep each other's results.
    """
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = json.loads(path.read_text()) if path.exists() else {}
        runs = done.setdefault(key, [])
        if run is not None:
            runs.append(run)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, path)
    return runs


def _worker(args: tuple[Config, str, int, int, int]) -> dict[str, Any]:
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch
    cfg, variant, seed, steps, threads = args
    torch.set_num_threads(threads)
    return run_one(cfg, variant, seed, steps)


def run_ablation(
    cfg: Config, *, variants: Sequence[str], seeds: Sequence[int], steps: int, workdir: str, jobs: int = 1, threads: int = 1
) -> list[dict[str, Any]]:
    """Run every (variant, seed) not yet in ``<workdir>/results.json`` and return all results of these settings.

    Raises:
        ValueError: On an unknown variant or bad counts.
    """
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is not known; choose from {list(VARIANTS)}")
    if steps < 2 or jobs < 1 or threads < 1 or not seeds:
        raise ValueError(f"steps={steps}, jobs={jobs}, threads={threads}, seeds={list(seeds)}; need steps >= 2, jobs >= 1, threads >= 1, a seed")
    if cfg.train.warmup_steps >= steps // 2:
        raise ValueError(
            f"train.warmup_steps={cfg.train.warmup_steps} is not below half of --steps {steps}; every stage of "
            "two_stage warms up on its own: allowed warmup_steps < steps // 2"
        )
    path = Path(workdir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _settings_key(cfg, steps)
    mine = _save_result(path, key, None)
    have = {(r["variant"], r["seed"]) for r in mine}
    todo = [(cfg, v, s, steps, threads) for s in seeds for v in variants if (v, s) not in have]
    log.info("ablation: %d runs to do, %d already in %s", len(todo), len(have), path)

    def record(r: dict[str, Any]) -> None:
        mine[:] = _save_result(path, key, r)
        log.info("%-9s seed %d: kNN %.1f%%, probe %.1f%% (%.0fs)", r["variant"], r["seed"], 100 * r["knn_top1"], 100 * r["probe_top1"], r["train_seconds"] + r["eval_seconds"])

    if jobs == 1:
        torch.set_num_threads(threads)
        for t in todo:
            record(run_one(*t[:4]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_worker, t) for t in todo]):
                record(fut.result())
    return [r for r in mine if r["variant"] in variants and r["seed"] in seeds]


_T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
"""Two-sided 5 % critical values of Student's t by degrees of freedom (n1 + n2 - 2); 2.0 beyond."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict[str, Any]], variants: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{variant: {metric: (mean %, std %)}}`` over seeds (sample std, n - 1)."""
    out = {}
    for v in variants:
        rows = [r for r in results if r["variant"] == v]
        if rows:
            out[v] = {m: tuple(100 * x for x in _mean_std([r[m] for r in rows])) for m in ("knn_top1", "probe_top1", "knn_top5", "probe_top5")}
            out[v]["feature_std"] = _mean_std([r["feature_std"] for r in rows])
            out[v]["n"] = (len(rows), 0.0)
    return out


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def render_markdown(
    results: list[dict[str, Any]], cfg: Config, *, variants: Sequence[str], seeds: Sequence[int], steps: int,
    command: str, num_classes: int, png_name: str, notes: str = "",
) -> str:
    """The report: how it was run, the table (mean +- std over seeds), per-seed values, a verdict."""
    import torch  # here, not at import time: `m3i --help` and `m3i pipeline` need no torch
    s = summarise(results, variants)
    stamped = [r for r in results if "started_unix" in r]
    t0, t1 = (min(r["started_unix"] for r in stamped), max(r["finished_unix"] for r in stamped)) if stamped else (0.0, 0.0)
    utc = lambda ts: datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)  # noqa: E731
    run_minutes = sum(r["train_seconds"] + r["eval_seconds"] for r in results) / 60
    f = lambda m, sd: f"{m:.1f} ± {sd:.1f}"  # noqa: E731
    o, t, d = cfg.objective, cfg.train, cfg.data
    lines = [
        "# Ablation: does all-in-one beat each part?",
        "",
        f"Generated by `m3i ablate` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"(git {_git_revision()}, python {platform.python_version()}, torch {torch.__version__}, "
        f"{len(os.sched_getaffinity(0))} cores shared with other jobs, load average at the end "
        f"{os.getloadavg()[0]:.1f}). {len(results)} runs of {run_minutes:.1f} min in all took {(t1 - t0) / 60:.1f} min of "
        f"wall time, from the first run's start to the last one's end ({utc(t0):%Y-%m-%d %H:%M}-{utc(t1):%H:%M} UTC).",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Settings",
        "",
        "- arms: " + "; ".join(
            f"`{v}` " + ", then ".join(
                "+".join(b for b, on in zip(("img", "cls", "txt"), st[:3]) if on) + f" on {'/'.join(st[3])}" for st in VARIANTS[v].stages
            ) for v in variants
        ) + ". Single-branch arms read only the sources their branch learns from, so every sample of their batches counts.",
        f"- data: the demo set (`m3i demo-data`, sharded with `m3i shard`) at `{d.shards}`: {num_classes} shape classes, "
        f"{d.image_size} px; scored on the held-out `{cfg.evaluate.eval_split}` split.",
        f"- model: `{cfg.model.backbone}`, patch {cfg.model.patch_size}; every run {steps} optimizer steps at batch "
        f"{d.batch_size} on one process (two-stage: {steps // 2} + {steps - steps // 2}).",
        f"- optimiser: AdamW, peak LR {t.lr:g} x {d.batch_size}/256 = {t.lr * d.batch_size / 256:.2e}, "
        f"{t.warmup_steps} warm-up steps, cosine to {t.min_lr:g}, weight decay {t.weight_decay:g}, betas {tuple(t.betas)}, "
        f"clip {t.grad_clip:g}.",
        f"- objective: weights img {o.w_img:g} / cls {o.w_cls:g} / txt {o.w_txt:g}, mask ratio {o.mask_ratio:g}, "
        f"mix images {o.mix_images}, EMA m0 {cfg.model.ema_m0:g}; label smoothing {o.label_smoothing:g}.",
        f"- seeds {', '.join(map(str, seeds))} (model init and data order); scores: kNN (k={cfg.evaluate.k}, "
        f"T={cfg.evaluate.knn_temperature:g}, cosine) and a linear probe ({cfg.evaluate.probe_epochs} epochs, AdamW "
        f"{cfg.evaluate.probe_lr:g}) on frozen online-backbone features; memory bank and probe data: the labelled "
        f"`{cfg.evaluate.train_split}` split. Chance is {100 / num_classes:.1f} %.",
        "",
        "## Results",
        "",
        f"Top-1 accuracy in %, mean ± sample std over {len(seeds)} seeds.",
        "",
        "| variant | kNN top-1 | probe top-1 | kNN top-5 | probe top-5 | feature std |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        if v in s:
            r = s[v]
            lines.append(
                f"| {VARIANTS[v].label} (`{v}`) | {f(*r['knn_top1'])} | {f(*r['probe_top1'])} | {f(*r['knn_top5'])} | "
                f"{f(*r['probe_top5'])} | {r['feature_std'][0]:.3f} |"
            )
    lines += ["", f"![kNN and linear-probe top-1 per variant]({png_name})", "", "Per seed (kNN / probe top-1 %):", ""]
    lines += ["| variant | " + " | ".join(f"seed {x}" for x in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    for v in variants:
        cells = []
        for x in seeds:
            r = next((r for r in results if r["variant"] == v and r["seed"] == x), None)
            cells.append(f"{100 * r['knn_top1']:.1f} / {100 * r['probe_top1']:.1f}" if r else "-")
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    lines += ["", "## Verdict (computed)", ""]
    if "m3i" in s and len(s) > 1:
        n_m3i = int(s["m3i"]["n"][0])
        for metric, name in (("knn_top1", "kNN"), ("probe_top1", "linear probe")):
            others = [v for v in s if v != "m3i"]
            rival = max(others, key=lambda v: s[v][metric][0])
            (m1, s1), (m2, s2) = s["m3i"][metric], s[rival][metric]
            n2 = int(s[rival]["n"][0])
            se = math.sqrt(s1**2 / n_m3i + s2**2 / n2)
            t_stat = (m1 - m2) / se if se > 0 else (0.0 if m1 == m2 else math.copysign(math.inf, m1 - m2))
            crit = _T_CRIT.get(n_m3i + n2 - 2, 2.0)
            clear = "a clear" if abs(t_stat) > crit else "not a clear"
            if m1 >= m2:
                head = f"M3I has the best mean, {m1 - m2:.1f} points above the best other arm `{rival}`"
            else:
                head = f"M3I does **not** win: `{rival}` is best, M3I is {m2 - m1:.1f} points behind"
            lines.append(
                f"- {name}: {head}; t = {t_stat:.2f} (difference over its standard error from the seed std), "
                f"{clear} difference at the two-sided 5 % level (|t| > {crit})."
            )
    lines.append("")
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]], variants: Sequence[str], num_classes: int, steps: int, seeds: int) -> bytes:
    from m3i.evaluate.plot import bar_chart_png

    s = summarise(results, variants)
    vs = [v for v in variants if v in s]
    means = [[s[v]["knn_top1"][0], s[v]["probe_top1"][0]] for v in vs]
    spreads = [[s[v]["knn_top1"][1], s[v]["probe_top1"][1]] for v in vs]
    top = min(100.0, max(10.0, math.ceil(max(m + e for ms, es in zip(means, spreads) for m, e in zip(ms, es)) * 1.15 / 10) * 10))
    return bar_chart_png(
        vs, ["kNN top-1", "linear probe top-1"], means, spreads, ylabel="top-1 accuracy, %", ymax=top,
        title=f"held-out top-1, mean ± std over {seeds} seeds, {steps} steps each",
        reference=100 / num_classes, reference_label=f"chance ({100 / num_classes:.1f} %)",
    )


def cmd_ablate(args: argparse.Namespace, cfg: Config) -> int:
    """The ``m3i ablate`` subcommand (see the module docstring)."""
    from m3i.evaluate import read_split_index

    results = run_ablation(cfg, variants=args.variants, seeds=args.seeds, steps=args.steps, workdir=args.workdir, jobs=args.jobs, threads=args.threads)
    num_classes = read_split_index(cfg.data.shards).num_classes
    doc = Path(args.doc)
    png = doc.with_suffix(".png")
    notes = ""
    if doc.exists():
        text = doc.read_text()
        if "\n## Notes" in text:
            notes = text[text.index("\n## Notes") + 1 :]
    command = shlex.join(["m3i", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("m3i", "__main__.py") else shlex.join(sys.argv)
    doc.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(_plot(results, args.variants, num_classes, args.steps, len(args.seeds)))
    doc.write_text(render_markdown(
        results, cfg, variants=args.variants, seeds=args.seeds, steps=args.steps, command=command,
        num_classes=num_classes, png_name=png.name, notes=notes,
    ))
    for v, r in summarise(results, args.variants).items():
        print(f"{v:10s} kNN top-1 {r['knn_top1'][0]:5.1f} ± {r['knn_top1'][1]:4.1f}   probe top-1 {r['probe_top1'][0]:5.1f} ± {r['probe_top1'][1]:4.1f}")
    print(f"wrote {doc} and {png}")
    return 0


def add_ablate_parser(sub: Any, config_args: Any) -> argparse.ArgumentParser:
    """Register ``m3i ablate`` on the CLI's subparsers (``config_args`` adds --preset/--config/--set); returns its parser."""
    p = sub.add_parser("ablate", help="M3I vs each branch alone vs two-stage, equal steps, several seeds -> Markdown + PNG")
    config_args(p, "demo")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="arms to run (default: all)")
    p.add_argument("--workdir", default="m3i-data/ablation", help="results.json goes here (default: %(default)s)")
    p.add_argument("--doc", default="docs/ablation.md", help="Markdown report; the PNG goes next to it (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    return p
