"""The ``m3i`` command line: one subcommand per stage.

    m3i demo-data [--out DIR]                  built-in demo images, offline
    m3i shard     [--preset P] [--config F] [--set shard.k=v] [--labelled DIR ...] [--webdataset PATTERN ...] [--verify]
    m3i train     [--preset P] [--config F] [--set train.k=v]   (one rank; torchrun for more)
    m3i export    [--preset P] [--config F] [--set export.k=v] [--checkpoint URI] [--out URI]
    m3i evaluate  [--preset P] [--config F] [--set evaluate.k=v] [--model URI] [--out URI]
    m3i promote   [--model URI] [--metrics URI] [--dry-run] | --to VERSION --reason TEXT | --list   (the champion)
    m3i ablate    --demo-root DIR [--preset demo] [--steps N] [--seeds 0 1 2] [--curve-every K]   = python -m experiments.ablation (a checkout's)
    m3i launch    [--scheduler local_cwd|kubernetes] [--kind volcano|pytorchjob|trainjob] [--dryrun] [-- train args]
    m3i demo      demo data -> shards -> one loader pass -> training (the preset's processes), on this machine
    m3i pipeline  compile | upload | run | schedule | params | run-local   (the Kubeflow pipeline m3i-pretrain)

Every stage takes ``--preset``, ``--config FILE`` and repeated ``--set section.key=value``.
Bad values exit with status 2 and one line naming the value; other failures with 1, among them an
unsafe or damaged artifact (:class:`m3i.artifacts.ArtifactError`), in one line wherever it was read.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from m3i import __version__
from m3i.cli_args import config_args, config_of, run_command, shard_input_args, shard_input_values, train_args

__all__ = ["main", "build_parser"]


def cmd_demo_data(args: argparse.Namespace) -> int:
    from m3i.demo import DemoCounts, make_demo_data

    counts = DemoCounts(**({"size": args.size} if args.size else {}))
    t0 = time.monotonic()
    paths = make_demo_data(args.out, counts, seed=args.seed)
    print(f"demo data in {args.out} ({time.monotonic() - t0:.1f}s):")
    for k, v in paths.items():
        print(f"  {k:10s} {v}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from m3i.shard import shard

    values = {**shard_input_values(args), **({"shard.out": args.out} if args.out else {})}
    if args.verify:
        if set(values) - {"shard.out"}:
            raise ValueError("shard --verify checks the data set at shard.out against its index; it takes no inputs")
        return _verify_shards(config_of(args, values).shard.out)
    cfg = config_of(args, values)
    index = shard(cfg.shard, progress=not args.quiet)
    _print_index(index)
    return 0


def _verify_shards(out: str) -> int:
    """``m3i shard --verify``: every shard the index lists, by size and streamed sha256; 1 on damage."""
    from m3i.shard import verify

    v = verify(out)
    if v.error is not None:
        print(f"m3i shard --verify: {v.error}", file=sys.stderr)
        return 1
    for key, problem in v.damaged:
        print(f"  damaged: {key}: {problem}")
    for key in v.unlisted:
        print(f"  not listed (the replaced index's, kept one publish, or a failed run's): {key}")
    verdict = "ok" if v.ok else f"DAMAGED: {len(v.damaged)} of {v.shards} shards; re-run the same `m3i shard` to repair"
    print(f"data set {v.uri}: {v.shards} shards checked, {v.bytes / 1e6:.1f} MB verified, {len(v.unlisted)} not listed: {verdict}")
    return 0 if v.ok else 1


def _print_index(index) -> None:
    raw = index.raw
    run = raw.get("run", {})
    print(f"data set {index.uri}: {raw['totals']['samples']} samples, {len(index.classes)} classes")
    for split, sp in sorted(raw["splits"].items()):
        srcs = ", ".join(f"{k} {v}" for k, v in sorted(sp["sources"].items()))
        print(f"  {split:5s} {sp['samples']:7d} samples in {len(sp['shards'])} shards ({srcs})")
    print(f"  bad inputs skipped: {raw['bad']['count']}")
    if run:
        print(f"  units written {run['units_written']}, reused {run['units_reused']}, {run['seconds']:.1f}s")
        if run.get("shards_repaired"):
            print(f"  damaged shards written again: {', '.join(run['shards_repaired'])}")


class _Tee:
    """Writes to several text streams (the demo's training log file and the terminal)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on built-in demo data, end to end on this machine."""
    from pathlib import Path

    from m3i.config import command_line
    from m3i.config.data import input_values
    from m3i.data import build_loader
    from m3i.demo import make_demo_data
    from m3i.launch import launch
    from m3i.shard import shard

    root = Path(args.workdir).resolve()
    raw = root / "raw"
    t0 = time.monotonic()
    paths = make_demo_data(raw)
    print(f"[1/4] demo data: {raw} ({time.monotonic() - t0:.1f}s)")
    placed = {"data.shards": str(root / "shards"), "train.output": str(root / "run")}
    inputs = {"labelled": [paths["labelled"]], "captions": [paths["captions"]], "unlabelled": [paths["unlabelled"]], "eval_labelled": [paths["eval"]]}
    cfg = config_of(args, {"shard.out": str(root / "shards"), **input_values(inputs), **placed})
    index = shard(cfg.shard, progress=not args.quiet)
    print("[2/4] shards:")
    _print_index(index)
    loader = build_loader(cfg.data)
    t0 = time.monotonic()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    dt = time.monotonic() - t0
    print(
        f"[3/4] loader: one epoch of split {cfg.data.split!r}: {len(loader)} batches x {cfg.data.batch_size} = {n} images "
        f"at {cfg.data.image_size}px in {dt:.2f}s ({n / dt:.0f} images/s, {cfg.data.num_workers} workers); failures {loader.stats()}"
    )
    # Training runs as the product runs it: m3i launch -> torchx -> torchrun -> m3i train (a process boundary: text).
    train_argv = ["--no-progress", *command_line(args.preset, args.config, args.overrides, placed)]
    print(f"[4/4] train: {cfg.launch.nodes}x{cfg.launch.nproc_per_node} processes via torchx {cfg.launch.scheduler}, {cfg.train.steps} steps")
    t0 = time.monotonic()
    log_path = root / "train.log"
    with open(log_path, "w") as log_file:
        result = launch(cfg.launch, train_argv, log=log_file if args.quiet else _Tee(log_file, sys.stdout))
    if not result.ok:
        tail = log_path.read_text().splitlines()[-40:]
        print(f"m3i demo: training {result.state} ({result.handle}); last lines of {log_path}:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        return result.exit_code
    from m3i.artifacts import read_summary

    summary = read_summary(cfg.train.output)
    loss = " ".join(f"{k}={v:.4f}" for k, v in summary.last_parts.items() if k.startswith("loss"))
    print(
        f"      {summary.steps} steps on {summary.world_size} ranks in {time.monotonic() - t0:.1f}s "
        f"(training loop {summary.seconds:.1f}s, {summary.skipped_steps} skipped); {loss}"
    )
    print(f"      checkpoint {summary.checkpoint}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """One rank of training; run N of them with torchrun or ``m3i launch``."""
    import os

    from m3i.train import Preempted, train

    cfg = config_of(args)
    # train() chooses the device first (train.device): CUDA asked for and unusable raises
    # DeviceUnavailable, a RuntimeError whose one line main() prints with exit 1.
    try:
        summary = train(cfg, progress=not (args.quiet or args.no_progress))
    except Preempted as e:
        print(f"m3i train: preempted: {e}", file=sys.stderr)
        return Preempted.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        loss = summary.last_parts
        print(
            f"trained {summary.steps} steps ({summary.samples} samples, {summary.skipped_steps} skipped) in "
            f"{summary.seconds:.1f}s" + (f", resumed from step {summary.resumed_from}" if summary.resumed_from is not None else "")
        )
        if loss:
            print("final loss " + " ".join(f"{k}={v:.4f}" for k, v in loss.items() if k.startswith("loss")))
        print(f"checkpoint {summary.checkpoint}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint -> backbone weights, timm config, model card and SHA256SUMS under a versioned prefix."""
    from m3i.export import export

    values = {**({"export.checkpoint": args.checkpoint} if args.checkpoint else {}), **({"export.out": args.out} if args.out else {})}
    r = export(config_of(args, values))
    print(
        f"exported step {r.step} of {r.checkpoint}: {r.encoder} encoder, {r.dtype}, {r.architecture} (timm {r.timm_architecture}) "
        f"({r.bytes / 1e6:.1f} MB) in {r.seconds:.1f}s"
    )
    print(f"model {r.name} {r.version} at {r.uri}")
    for label, uri in (("weights", r.weights), ("config", r.config), ("card", r.card), ("sha256", r.sums), ("manifest", r.manifest)):
        print(f"  {label:8s} {uri}")
    print(f'load with plain timm: timm.create_model("local-dir:<local copy of {r.uri}>", pretrained=True)')
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """kNN and linear probe (and an optional fine-tune) of an exported model or a checkpoint, against random init."""
    from m3i.artifacts import METRICS_FILE
    from m3i.config import is_set
    from m3i.evaluate import evaluate, score_lines

    values = {**({"evaluate.model": args.model} if args.model else {}), **({"evaluate.out": args.out} if args.out else {})}
    r = evaluate(config_of(args, values), data_from_model=not is_set("data.shards", args.preset, args.config, args.overrides))
    m = r.metrics
    print(
        f"evaluated {m['model']['name']} ({m['model']['kind']}, step {m['model']['step']}) on {m['data']['shards']}: "
        f"{m['counts']['train']} {m['data']['train_split']} / {m['counts']['eval']} {m['data']['eval_split']} labelled samples, "
        f"{m['num_classes']} classes"
    )
    for line in score_lines(m):
        print(f"  {line}")
    base = m.get("random_init")
    print(f"  feature std {m['feature_std']['eval']:.4f}" + (f" (random init {base['feature_std']['eval']:.4f})" if base else ""))
    if base:
        print(f"  random init: {base['architecture']} seeded with torch.manual_seed({base['seed']}) (seed source: {base['seed_source']})")
    if "loss_curves.png" in r.files:
        print(f"  loss curves {r.files['loss_curves.png']}")
    if r.pushed is not None:
        print(f"  pushgateway: {'pushed' if r.pushed else 'push failed (see warning)'}")
    print(f"metrics {r.files[METRICS_FILE]}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Hand the arguments to ``python -m experiments.ablation`` of the checkout this package runs from.

    The ablation is an experiment beside the package, not part of it: an installed wheel has no
    ``experiments/``, and the package never imports it. A process boundary, as between the
    ablation and the ``m3i train`` runs it starts.
    """
    import os
    import subprocess
    from pathlib import Path

    import m3i

    root = Path(m3i.__file__).resolve().parent.parent
    if not (root / "experiments" / "ablation" / "__main__.py").is_file():
        raise ValueError(
            f"m3i ablate runs experiments/ablation of a source checkout, and this m3i ({root}) is not one; from the root of a "
            "checkout of the m3i repository run `python -m experiments.ablation --demo-root DIR ...` (see docs/ablation.md)"
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "experiments.ablation", *(["--quiet"] if args.quiet else []), *args.args]
    return subprocess.run(cmd, env=env, check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3i", description="M3I all-in-one pre-training: shard, train, export, evaluate.")
    parser.add_argument("--version", action="version", version=f"m3i {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write the built-in demo data set (offline, deterministic)")
    p.add_argument("--out", default="m3i-data/raw", help="folder to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 64)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("shard", help="raw images -> WebDataset shards + index in object storage")
    config_args(p)
    p.add_argument("--out", help="output folder or s3://bucket/prefix (shard.out)")
    shard_input_args(p)
    p.add_argument(
        "--verify", action="store_true",
        help="check the data set at shard.out against its index (each shard's size and sha256) instead; exit 1 on damage",
    )
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="M3I pre-training, one rank (run under torchrun or `m3i launch` for more)")
    train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint -> backbone weights + config + model card that plain timm loads")
    config_args(p)
    p.add_argument("--checkpoint", metavar="URI", help="run output (latest complete checkpoint) or one checkpoint (export.checkpoint)")
    p.add_argument("--out", metavar="URI", help="export root folder or s3://bucket/prefix (export.out)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="kNN + linear probe on frozen features of held-out labelled images")
    config_args(p)
    p.add_argument("--model", metavar="URI", help="exported model folder, checkpoint or run output (evaluate.model)")
    p.add_argument("--out", metavar="URI", help="folder or s3://bucket/prefix for the results (evaluate.out)")
    p.set_defaults(func=cmd_evaluate)

    # Every argument after `ablate` goes to the experiment as it is (its --help included): with no
    # prefix character of its own, this parser takes `--steps 4` for plain words.
    p = sub.add_parser(
        "ablate", add_help=False, prefix_chars="+",
        help="M3I vs each branch alone vs two-stage, per attribute -> Markdown + PNG (python -m experiments.ablation of a checkout)",
    )
    p.add_argument("args", nargs="*", help="arguments of python -m experiments.ablation (see its --help)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("demo", help="demo data -> shards -> loader pass -> training, on this machine")
    config_args(p, default_preset="demo")
    p.add_argument("--workdir", default="m3i-data", help="where the demo writes (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    from m3i.launch.cli import add_launch_parser
    from m3i.pipeline.cli import add_pipeline_parser
    from m3i.promote.cli import add_promote_parser

    add_promote_parser(sub)
    add_launch_parser(sub)
    add_pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``m3i`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_command(f"m3i {args.command}", lambda: args.func(args), quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
