"""One CLI vocabulary (#21 item 5): every command spells --preset/--config/--set, the shard input
flags and the train arguments through m3i/cli_args.py; typed values inside a process, --set text
only where a process or pod starts (the pipeline's train step, launch, the demo)."""

from __future__ import annotations

import argparse

import pytest

from m3i.cli import build_parser
from m3i.cli_args import config_args, overrides_arg, shard_input_args, train_args, train_parser
from m3i.config import command_line, load_config


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> dict[str, tuple]:
    """``{option: (dest, action class, metavar, help, default)}`` of a parser (its groups included)."""
    return {s: (a.dest, type(a).__name__, a.metavar, a.help, a.default) for a in p._actions for s in a.option_strings}


def _reference(adder, *args, **kw) -> dict[str, tuple]:
    p = argparse.ArgumentParser()
    adder(p, *args, **kw)
    return {k: v for k, v in _options(p).items() if k not in ("-h", "--help")}


COMMANDS_WITH_CONFIG = ("shard", "train", "export", "evaluate", "demo", "launch", "promote")


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG)
def test_every_command_spells_the_config_arguments_once(command):
    sub = _commands(build_parser())[command]
    want = _reference(config_args, default_preset="demo" if command == "demo" else None)
    assert {k: _options(sub)[k] for k in want} == want


def test_the_shard_inputs_and_set_of_run_local_are_m3i_shards():
    commands = _commands(build_parser())
    run_local = _commands(commands["pipeline"])["run-local"]
    inputs = _reference(shard_input_args)
    for p in (commands["shard"], run_local):
        got = _options(p)
        assert {k: got[k] for k in inputs if k != "--eval-fraction"} == {k: v for k, v in inputs.items() if k != "--eval-fraction"}
        assert got["--eval-fraction"][:2] == ("eval_fraction", "_StoreAction")
    assert {k: _options(run_local)[k] for k in ("--set",)} == _reference(overrides_arg)


def test_the_ablation_experiment_takes_the_same_config_arguments():
    from experiments.ablation.cli import build_parser as ablation_parser

    want = _reference(config_args, default_preset="demo")
    assert {k: _options(ablation_parser())[k] for k in want} == want


def test_train_parser_is_the_train_command():
    train = _commands(build_parser())["train"]
    assert _options(train_parser()) == _options(train) and set(_reference(train_args)) <= set(_options(train))


def test_command_line_reads_back_through_the_train_parser(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("data:\n  batch_size: 5\n")
    values = {"train.output": str(tmp_path / "out dir"), "train.run_id": "0x10", "data.sources": ("labelled",)}
    ns = train_parser().parse_args(["--no-progress", *command_line("demo", str(f), ["train.steps=4"], values)])
    cfg = load_config(ns.preset, ns.config, ns.overrides)
    assert cfg == load_config("demo", f, ["train.steps=4"], values) and ns.no_progress
    assert (cfg.train.run_id, cfg.data.batch_size, cfg.train.steps) == ("0x10", 5, 4)


def test_launch_checks_its_ranks_arguments_with_the_train_parser(capsys):
    from m3i.launch.cli import check_train_args

    assert check_train_args(["--preset", "demo", "--set", "train.steps=2"], local=True).train.steps == 2
    with pytest.raises(SystemExit) as e:
        check_train_args(["--bogus"], local=True)
    assert e.value.code == 2 and "m3i train: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_shard_input_flags_become_values_by_the_one_rule():
    from m3i.cli_args import shard_input_values

    ns = build_parser().parse_args(
        ["shard", "--labelled", "a", "--labelled", "b", "--webdataset", "w/{0..1}.tar", "--eval-fraction", "0.2",
         "--set", "shard.captions=[c.jsonl]"]
    )
    assert shard_input_values(ns) == {
        "shard.labelled": ["a", "b"], "shard.unlabelled": [], "shard.eval_labelled": [], "shard.webdataset": ["w/{0..1}.tar"],
        "shard.eval_fraction": 0.2,
    }  # captions kept: set by hand with --set
    assert shard_input_values(build_parser().parse_args(["shard"])) == {}


@pytest.mark.parametrize("run_id", ["0x10", "true", "1e3", "007"])
def test_the_train_step_hands_its_ranks_the_run_id_it_was_given(monkeypatch, tmp_path, run_id):
    """The step's arguments are typed values until the ranks' --set text: a run id YAML would read
    as a number or a boolean (a KFP run name can be any text) reaches them unchanged."""
    import m3i.launch
    from m3i.launch import LaunchResult
    from m3i.pipeline.steps import train_model
    from m3i.storage import open_store

    seen = {}

    def fake_launch(cfg, train_args, **kw):
        seen["cfg"], seen["args"] = cfg, list(train_args)
        open_store(str(tmp_path / "run")).write_json(
            "summary.json",
            {"run_id": run_id, "resumed_from": None, "checkpoint": "ck", "steps": 5, "samples": 10, "skipped_steps": 0,
             "world_size": 1, "seconds": 1.0, "last_parts": {"loss": 1.0}},
        )
        return LaunchResult("local_cwd", "SUCCEEDED", handle="local:1")

    monkeypatch.setattr(m3i.launch, "launch", fake_launch)
    train_model("s3://b/ds", str(tmp_path / "run"), run_id=run_id, steps=5, preset="demo", overrides=["data.batch_size=3"])
    args = seen["args"]
    assert args[0] == "--no-progress"
    ns = train_parser().parse_args(args)
    cfg = load_config(ns.preset, ns.config, ns.overrides)
    assert (cfg.train.run_id, cfg.train.steps, cfg.data.batch_size, cfg.data.shards) == (run_id, 5, 3, "s3://b/ds")
    assert seen["cfg"].scheduler == "local_cwd" and seen["cfg"].nproc_per_node == load_config("demo").launch.nproc_per_node


def test_a_bad_step_argument_names_its_key(tmp_path):
    from m3i.pipeline.steps import train_model

    with pytest.raises(ValueError, match=r"train.precision='fp8' is not allowed"):
        train_model("s3://b/ds", str(tmp_path / "run"), precision="fp8", preset="demo")
    with pytest.raises(ValueError, match=r"train.zero_stage=7 is not allowed; choose one of \[0, 1, 2, 3\]"):
        train_model("s3://b/ds", str(tmp_path / "run"), zero_stage=7, preset="demo")
