"""``python -m experiments.ablation`` (and ``m3i ablate``, which hands its arguments here): run, summarise, report.

    python -m experiments.ablation --preset demo --demo-root m3i-data/abl/raw --steps 300 --seeds 0 1 2 --curve-every 100

Exit status as ``m3i``'s: 2 for a bad value (one line naming it), 1 for a failed run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from experiments.ablation.arms import VARIANTS
from m3i.cli_args import config_args, config_of, run_command

__all__ = ["build_parser", "main"]

PROG = "python -m experiments.ablation"


def build_parser() -> argparse.ArgumentParser:
    """The experiment's arguments: the run config (``--preset/--config/--set``, as every ``m3i`` command) and the arms."""
    p = argparse.ArgumentParser(
        prog=PROG, description="M3I vs each branch alone vs two-stage, equal steps, several seeds, per attribute -> Markdown + PNG",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    config_args(p, default_preset="demo")
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


def _run(args: argparse.Namespace, command: str) -> int:
    from experiments.ablation.report import write_report
    from experiments.ablation.run import run_ablation
    from experiments.ablation.stats import summarise

    cfg = config_of(args)
    ab = run_ablation(
        cfg, demo_root=args.demo_root, variants=args.variants, seeds=args.seeds, steps=args.steps, curve_every=args.curve_every,
        workdir=args.workdir, attributes=args.attributes, jobs=args.jobs, threads=args.threads,
    )
    doc, png = write_report(
        ab, doc=args.doc, variants=args.variants, seeds=args.seeds, steps=args.steps, curve_every=args.curve_every,
        attributes=args.attributes, command=command,
    )
    for a, arms in summarise(ab.results, args.variants, args.attributes).items():
        for v, r in arms.items():
            print(f"{a:9s} {v:11s} kNN top-1 {r['knn_top1'][0]:5.1f} ± {r['knn_top1'][1]:4.1f}   probe top-1 {r['probe_top1'][0]:5.1f} ± {r['probe_top1'][1]:4.1f}")
    print(f"wrote {doc} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ablation with these arguments (``sys.argv[1:]`` by default); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _run(args, shlex.join([*PROG.split(), *argv])), quiet=args.quiet)
