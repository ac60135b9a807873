"""The command line's one vocabulary: the arguments every ``m3i`` command (and the ablation experiment) shares.

    config_args(p)            --preset, --config FILE, --set SECTION.KEY=VALUE (repeatable)
    shard_input_args(p)       --labelled, --captions, --unlabelled, --eval-labelled, --webdataset, --eval-fraction
    train_args(p)             what ``m3i train`` takes: the config arguments and --no-progress
    train_parser()            ``m3i train``'s parser alone (``m3i launch`` checks what its ranks will get)

and what they become: :func:`config_of` loads the config they name, with a command's own flags
as typed values (``{"export.out": args.out}``); :func:`shard_input_values` turns the shard input
flags into ``shard.*`` values by the one rule of :func:`m3i.config.data.input_values`. Their
command-line form for another process is :func:`m3i.config.command_line`.

Only the command modules use this one (``m3i/cli.py``, ``m3i/launch/cli.py``, ``m3i/pipeline/cli.py``,
``m3i/promote/cli.py``, ``experiments/ablation/cli.py``); they never import each other's parsers.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from m3i.config import Config, load_config
from m3i.config.data import INPUT_KINDS, input_values

__all__ = [
    "config_args",
    "config_of",
    "given_inputs",
    "overrides_arg",
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
