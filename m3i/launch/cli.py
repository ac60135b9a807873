"""The ``m3i launch`` subcommand, wired into :mod:`m3i.cli`.

    m3i launch [--preset P] [--config F] [--set launch.k=v ...] [--dryrun | --wait [--timeout S]] [-- <m3i train args>]

The config options build the ``launch`` section only; everything after ``--`` is handed to
``m3i train`` verbatim (on Kubernetes, paths in it are paths inside the image).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = ["add_launch_parser", "cmd_launch"]

_SHORTHANDS = (
    ("scheduler", "launch.scheduler", str, "local_cwd or kubernetes"),
    ("kind", "launch.kind", str, "on kubernetes: volcano or pytorchjob"),
    ("nodes", "launch.nodes", int, "pods (hosts)"),
    ("nproc_per_node", "launch.nproc_per_node", int, "training processes per pod"),
    ("image", "launch.image", str, "pinned container image"),
)


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``launch`` to the ``m3i`` subcommands; returns its parser (``func`` is :func:`cmd_launch`)."""
    p = subparsers.add_parser(
        "launch",
        help="run m3i train under torchrun: here (local_cwd) or on Kubernetes (Volcano Job, PyTorchJob)",
        description="Run `m3i train` under torchrun. Arguments after `--` go to `m3i train` verbatim.",
    )
    g = p.add_argument_group("config")
    g.add_argument("--preset", help="packaged preset")
    g.add_argument("--config", metavar="FILE", help="YAML file of sections, applied over the preset")
    g.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one value (repeatable)"
    )
    for dest, key, tp, help_ in _SHORTHANDS:
        p.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=tp, help=f"{help_} ({key})")
    p.add_argument("--dryrun", action="store_true", help="print what would run or be submitted; start nothing")
    p.add_argument(
        "--wait", action="store_true",
        help="on kubernetes: follow the job (state, pod logs) until it ends, then delete it; exit 1 unless it succeeded",
    )
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: delete the job after S seconds")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_ARGS", help="arguments of m3i train")
    p.set_defaults(func=cmd_launch)
    return p


def _train_args(raw: Sequence[str]) -> list[str]:
    args = list(raw)
    return args[1:] if args[:1] == ["--"] else args


def cmd_launch(args: argparse.Namespace) -> int:
    """Run ``m3i launch``; prints the dry run or the outcome, returns the exit status."""
    from m3i.config import load_config
    from m3i.launch import launch

    extra = [f"{key}={getattr(args, dest)}" for dest, key, _, _ in _SHORTHANDS if getattr(args, dest) is not None]
    cfg = load_config(args.preset, args.config, [*args.overrides, *extra]).launch
    if args.wait and not args.dryrun:
        if cfg.scheduler != "kubernetes":
            raise ValueError(f"--wait follows a Kubernetes job; launch.scheduler={cfg.scheduler!r} already waits")
        from m3i.launch.watch import run_cluster_job

        result = run_cluster_job(cfg, _train_args(args.train_args), timeout_s=args.timeout)
        print(f"{result.state}: {result.handle}")
        return result.exit_code
    result = launch(cfg, _train_args(args.train_args), dryrun=args.dryrun)
    if result.rendered is not None:
        print(result.rendered, end="" if result.rendered.endswith("\n") else "\n")
    else:
        print(f"{result.state}: {result.handle}")
    return result.exit_code
