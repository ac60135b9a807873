"""The command line's one vocabulary: the arguments every ``m3i`` command (and the ablation experiment) shares.

    config_args(p)            --preset, --config FILE, --set SECTION.KEY=VALUE (repeatable)
    shard_input_args(p)       --labelled, --captions, --unlabelled, --eval-labelled, --webdataset, --eval-fraction
    train_args(p)             what ``m3i train`` takes: the config arguments and --no-progress
    train_parser()            ``m3i train``'s parser alone (``m3i launch`` checks what its ranks will get)
    run_command(prog, call)   logging, then the command's body; failures as one line and an exit status

and what they become: :func:`config_of` loads the config they name, with a command's own flags
as typed values (``{"export.out": args.out}``); :func:`shard_input_values` turns the shard input
flags into ``shard.*`` values by the one rule of :func:`m3i.config.data.input_values`. Their
command-line form for another process is :func:`m3i.config.command_line`.

Only the command modules use this one (``m3i/cli.py``, ``m3i/launch/cli.py``, ``m3i/pipeline/cli.py``,
``m3i/promote/cli.py``, ``experiments/ablation/cli.py``); they never import each other's parsers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Mapping

from m3i.config import Config, load_config
from m3i.config.data import INPUT_KINDS, input_values

__all__ = [
    "config_args",
    "config_of",
    "given_inputs",
    "overrides_arg",
    "run_command",
    "shard_input_args",
    "shard_input_values",
    "train_args",
    "train_parser",
]

_INPUT_HELP = {
    "labelled": ("DIR", "folder of class sub-folders (repeatable)"),
    "captions": ("FILE", "JSONL/CSV of image,caption (repeatable)"),
    "unlabelled": ("DIR", "folder of images (repeatable)"),
    "eval_labelled": ("DIR", "held-out folder of class sub-folders (repeatable)"),
    "webdataset": (
        "PATTERN", "existing WebDataset tars, local or s3://, brace patterns like 'data-{00000..00099}.tar' (repeatable)",
    ),
}


def overrides_arg(p: argparse.ArgumentParser | Any) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one value (repeatable)"
    )


def config_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    """The ``config`` group: ``--preset``, ``--config FILE`` and ``--set`` (see :func:`m3i.config.load_config`)."""
    g = p.add_argument_group("config")
    g.add_argument("--preset", default=default_preset, help="packaged preset (default: %(default)s)")
    g.add_argument("--config", metavar="FILE", help="YAML file of sections, applied over the preset")
    overrides_arg(g)


def config_of(args: argparse.Namespace, values: Mapping[str, Any] | None = None) -> Config:
    """The config that ``args``' config group names, ``values`` (a command's own flags) set last.

    Raises:
        ValueError: As :func:`m3i.config.load_config`: one line naming the key and the value.
    """
    return load_config(args.preset, args.config, args.overrides, values)


def shard_input_args(p: argparse.ArgumentParser, eval_fraction_help: str = "shard.eval_fraction") -> None:
    """The raw inputs of ``m3i shard`` (each repeatable) and ``--eval-fraction``."""
    for kind in INPUT_KINDS:
        metavar, help_ = _INPUT_HELP[kind]
        p.add_argument(f"--{kind.replace('_', '-')}", dest=kind, action="append", metavar=metavar, help=help_)
    p.add_argument("--eval-fraction", type=float, help=f"fraction of each labelled class held out ({eval_fraction_help})")


def given_inputs(args: argparse.Namespace) -> dict[str, list[str]]:
    """``{kind: paths}`` of the shard input flags given (none: ``{}``)."""
    return {k: list(getattr(args, k)) for k in INPUT_KINDS if getattr(args, k)}


def shard_input_values(args: argparse.Namespace) -> dict[str, Any]:
    """The ``shard.*`` values of the shard input flags and ``--eval-fraction``.

    Inputs on the command line are the whole input: a preset's own paths (the demo's) are not
    mixed in, though a kind set by ``--set shard.<kind>=...`` and given no flag keeps that value.
    """
    given = given_inputs(args)
    by_hand = {o.split("=", 1)[0].strip() for o in args.overrides}
    values: dict[str, Any] = input_values(given, keep={k for k in INPUT_KINDS if f"shard.{k}" in by_hand}) if given else {}
    if args.eval_fraction is not None:
        values["shard.eval_fraction"] = args.eval_fraction
    return values


def train_args(p: argparse.ArgumentParser) -> None:
    """What ``m3i train`` takes: the config arguments and ``--no-progress``."""
    config_args(p)
    p.add_argument("--no-progress", action="store_true", help="log a line every train.log_every steps instead of a progress bar")


def train_parser() -> argparse.ArgumentParser:
    """``m3i train``'s arguments alone: what ``m3i launch`` checks its ranks' arguments with."""
    p = argparse.ArgumentParser(prog="m3i train", description="M3I pre-training, one rank")
    train_args(p)
    return p


def run_command(prog: str, call: Callable[[], int], *, quiet: bool = False) -> int:
    """Set up logging, run a command's body and return its exit status; the one mapping of failures.

    Exit 2 with ``<prog>: error: ...`` for a bad value (``ValueError``); exit 1 with
    ``<prog>: failed: ...`` for an unsafe or damaged artifact (one line, wherever it was read),
    storage, runtime and OS failures, and errors of remote API clients (KFP, Kubernetes, urllib3:
    status and reason only, never the response body). Anything else propagates with its traceback.

    Args:
        prog: What the messages start with, e.g. ``m3i train``.
        call: The command's body; returns the exit status.
        quiet: Warnings only, no progress logging.
    """
    from m3i.artifacts.errors import ArtifactError
    from m3i.storage import StorageError

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return call()
    except ArtifactError as e:  # a ValueError too: named first, it is a failed run, not a bad value
        print(f"{prog}: failed: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (StorageError, RuntimeError, OSError, LookupError) as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        remote = _remote_error(e)
        if remote is None:
            raise
        print(f"{prog}: failed: {remote}", file=sys.stderr)
        return 1


def _remote_error(e: Exception) -> str | None:
    """One line for an error of a remote API client (KFP, Kubernetes, urllib3), else ``None``.

    Their exceptions carry the whole HTTP response; the status and reason say enough, and
    response bodies and headers stay out of the terminal.
    """
    module = type(e).__module__ or ""
    if not module.startswith(("kfp_server_api", "kubernetes", "urllib3")):
        return None
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    if status is not None:
        return f"{type(e).__name__}: HTTP {status} {reason or ''}".rstrip()
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
