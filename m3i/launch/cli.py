"""The ``m3i launch`` subcommand, which :mod:`m3i.cli` registers (this module imports no other command's).

    m3i launch [--preset P] [--config F] [--set launch.k=v ...] [--dryrun | --wait [--timeout S]] [-- <m3i train args>]

``--preset``, ``--config`` and ``--set`` describe the whole run: ``launch`` consumes the
``launch`` section and forwards the rest to every rank's ``m3i train`` (on Kubernetes a
``--config`` file travels as ``--set`` pairs, since the pods cannot read this machine's
files). Everything after ``--`` is appended verbatim and wins over what was forwarded (on
Kubernetes, paths in it are paths inside the image). The whole config is validated before
anything starts: an unknown key or a bad value exits 2, and so do loaders that would not fit in
``/dev/shm`` (:mod:`m3i.launch.shm`; a warning when they only just fit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from m3i.cli_args import config_args, config_of, train_parser

__all__ = ["add_launch_parser", "cmd_launch"]

_SHORTHANDS = (
    ("scheduler", "launch.scheduler", str, "local_cwd or kubernetes"),
    ("kind", "launch.kind", str, "on kubernetes: volcano, pytorchjob or trainjob"),
    ("nodes", "launch.nodes", int, "pods (hosts)"),
    ("gpus_per_node", "launch.gpus_per_node", int, "nvidia.com/gpu per pod, one rank per GPU unless --nproc-per-node says otherwise"),
    ("nproc_per_node", "launch.nproc_per_node", int, "training processes per pod; 0: one per GPU, or 1 without GPUs"),
    ("image", "launch.image", str, "pinned container image"),
)


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``launch`` to the ``m3i`` subcommands; returns its parser (``func`` is :func:`cmd_launch`)."""
    p = subparsers.add_parser(
        "launch",
        help="run m3i train under torchrun: here (local_cwd) or on Kubernetes (Volcano Job, PyTorchJob, TrainJob)",
        description="Run `m3i train` under torchrun. Arguments after `--` go to `m3i train` verbatim.",
    )
    config_args(p)
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


def forwarded_train_args(args: argparse.Namespace, scheduler: str) -> list[str]:
    """``m3i train`` arguments for the config options given to ``m3i launch`` (all but the ``launch`` section).

    Locally the ``--config`` file is passed by its absolute path; on Kubernetes the pods
    cannot read it, so its sections other than ``launch`` become ``--set`` pairs.
    """
    out: list[str] = ["--preset", args.preset] if args.preset else []
    if args.config:
        if scheduler == "local_cwd":
            out += ["--config", str(Path(args.config).resolve())]
        else:
            import yaml

            from m3i.config.overrides import flat_values, override_strings

            data = yaml.safe_load(Path(args.config).read_text()) or {}
            values = flat_values({section: body for section, body in data.items() if section != "launch"})
            out += [a for pair in override_strings(values) for a in ("--set", pair)]
    for item in args.overrides:
        if not item.strip().startswith("launch."):
            out += ["--set", item]
    return out


def check_train_args(train_args: Sequence[str], *, local: bool) -> Any:
    """Parse and validate what every rank's ``m3i train`` will get, before anything starts.

    Returns:
        The :class:`m3i.config.Config` the ranks will load (on Kubernetes without a ``--config``
        file that only the image holds).

    Raises:
        ValueError: An unknown section, key or preset, or a value a section rejects.
        SystemExit: (exit 2) An argument ``m3i train`` does not take.
    """
    from m3i.config import load_config

    ns = train_parser().parse_args(list(train_args))
    # On Kubernetes a --config after `--` names a file inside the image: check it only if it is here too.
    config = ns.config if ns.config and (local or Path(ns.config).is_file()) else None
    try:
        return load_config(ns.preset, config, ns.overrides)
    except ValueError as e:
        raise ValueError(f"m3i train would refuse its arguments {list(train_args)}: {e}") from None


def cmd_launch(args: argparse.Namespace) -> int:
    """Run ``m3i launch``; prints the dry run or the outcome, returns the exit status."""
    from m3i.launch import launch

    values = {key: getattr(args, dest) for dest, key, _, _ in _SHORTHANDS if getattr(args, dest) is not None}
    cfg = config_of(args, values).launch
    train_args = [*forwarded_train_args(args, cfg.scheduler), *_train_args(args.train_args)]
    train_cfg = check_train_args(train_args, local=cfg.scheduler == "local_cwd")
    # The loaders' shared memory: refused (ValueError, exit 2) when it cannot fit, a warning when tight.
    from m3i.launch.shm import check_shm

    warning = check_shm(cfg, train_cfg)
    if warning:
        print(f"m3i launch: warning: {warning}", file=sys.stderr)
    if args.wait and not args.dryrun:
        if cfg.scheduler != "kubernetes":
            raise ValueError(f"--wait follows a Kubernetes job; launch.scheduler={cfg.scheduler!r} already waits")
        from m3i.launch.watch import run_cluster_job

        result = run_cluster_job(cfg, train_args, timeout_s=args.timeout)
        print(f"{result.state}: {result.handle}")
        return result.exit_code
    result = launch(cfg, train_args, dryrun=args.dryrun)
    if result.rendered is not None:
        print(result.rendered, end="" if result.rendered.endswith("\n") else "\n")
    else:
        print(f"{result.state}: {result.handle}")
    return result.exit_code
