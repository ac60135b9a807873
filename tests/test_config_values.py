"""Typed overrides (#21 item 5): values set inside a process are checked as ``--set`` is, and become
``--set`` text only at a process boundary, text that reads back as the same values."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from m3i.config import Config, command_line, load_config, override_strings, with_values
from m3i.config.data import INPUT_KINDS, input_values
from m3i.config.overrides import flat_values
from m3i.config.yaml_text import parse_override

AWKWARD = [
    "true", "no", "null", "~", "", " lead", "trail ", "0x10", "1e3", "1.0", "010", "2024-01-02", "a: b", "#x", "x #y", "[x", "{x",
    "'q'", '"dq"', "s3://b/p/{00..09}.tar", "x\ny", "é ü 漢", "- item", "*alias", "&anchor", "!tag", "%p", "@nightly", "`x",
]


@pytest.mark.parametrize("value", [*AWKWARD, 0, -3, 2**62, 1e-5, 1.5, -0.0, True, False, None, [], ["a:b", "1", "true"],
                                   {"pool": "gpu", "zone": "1"}, {"a": {"b": [1, "2"]}}, ("x", "y")])
def test_override_strings_read_back_as_the_same_value(value):
    (text,) = override_strings({"s.k": value})
    path, back = parse_override(text)
    assert path == ["s", "k"]
    want = list(value) if isinstance(value, tuple) else value
    assert back == want and type(back) is type(want)
    if isinstance(value, float) and value == 0:
        assert math.copysign(1, back) == math.copysign(1, value)


def test_a_typed_value_is_what_the_same_set_gives():
    """load_config(values=) and with_values agree with --set of override_strings' text, for every field kind."""
    values = {
        "train.steps": 7, "train.lr": 3e-4, "train.run_id": "0x10", "train.output": Path("/tmp/run"), "data.shards": "s3://b/ds",
        "data.sources": ("labelled", "captioned"), "launch.node_selector": {"pool": "gpu"}, "shard.resize": None,
        "shard.labelled": ["a", "b"], "objective.mix_images": False,
    }
    by_text = load_config("demo", overrides=override_strings(values))
    assert load_config("demo", values=values) == by_text
    assert with_values(load_config("demo"), values) == by_text
    assert by_text.train.run_id == "0x10" and by_text.train.output == "/tmp/run" and by_text.data.sources == ("labelled", "captioned")
    assert load_config("demo", values={}) == load_config("demo")


def test_values_come_after_overrides_and_are_checked_together():
    cfg = load_config("demo", overrides=["train.steps=3", "data.batch_size=5"], values={"train.steps": 9})
    assert cfg.train.steps == 9 and cfg.data.batch_size == 5
    # Checked once, with the rest: a --set that is only valid with the value given after it passes.
    cfg = load_config("demo", overrides=["model.global_pool=token"], values={"objective.mix_images": False})
    assert cfg.model.global_pool == "token"
    with pytest.raises(ValueError, match="global_pool='token' with objective.mix_images=true"):
        with_values(load_config("demo", values={"objective.mix_images": False}), {"model.global_pool": "token", "objective.mix_images": True})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train.steps": "x"}, "config.train.steps='x' is not an integer"),
        ({"train.steps": 2.0}, "config.train.steps=2.0 is not an integer"),
        ({"train.steps": 0}, "train.steps=0"),
        ({"train.stepz": 1}, r"config.train: unknown key\(s\) \['stepz'\]"),
        ({"trian.steps": 1}, r"config: unknown key\(s\) \['trian'\]"),
        ({"train.steps.x": 1}, "override train.steps.x=1: 'steps' is a value, not a section"),
        ({"": 1}, "override key '' must look like section.key"),
        ({"shard.eval_fraction": math.inf}, "config.shard.eval_fraction=inf is not a finite number"),
    ],
)
def test_a_bad_value_names_its_key_as_set_does(values, message):
    with pytest.raises(ValueError, match=message):
        load_config("demo", values=values)
    with pytest.raises(ValueError, match=message):
        with_values(load_config("demo"), values)
    if "" not in values:  # the same message as the --set of that value
        with pytest.raises(ValueError, match=message.replace("override ", "--set '").replace("=1:", "=1':")):
            load_config("demo", overrides=override_strings(values))


def test_with_values_on_a_section_takes_its_own_keys():
    shard = load_config("demo").shard
    out = with_values(shard, {"shard.out": "/tmp/s", "shard.eval_fraction": 0.25})
    assert (out.out, out.eval_fraction, out.labelled) == ("/tmp/s", 0.25, shard.labelled)
    with pytest.raises(ValueError, match="override key 'train.steps' is not in section 'shard'"):
        with_values(shard, {"train.steps": 1})
    with pytest.raises(ValueError, match="shard.eval_fraction=1.0 is out of range"):
        with_values(shard, {"shard.eval_fraction": 1.0})
    with pytest.raises(TypeError, match="a Config or one of its sections"):
        with_values(object(), {})


def test_command_line_is_what_load_config_takes(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  steps: 4\n")
    argv = command_line("demo", str(f), ["data.batch_size=3"], {"train.run_id": "true", "shard.labelled": ("x",)})
    assert argv[:4] == ["--preset", "demo", "--config", str(f)]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["data.batch_size=3", "train.run_id='true'", "shard.labelled=[x]"]
    cfg = load_config("demo", f, sets)
    assert (cfg.train.steps, cfg.data.batch_size, cfg.train.run_id, cfg.shard.labelled) == (4, 3, "true", ("x",))
    assert command_line() == []


def test_flat_values_walks_into_mappings():
    assert flat_values({"data": {"batch_size": 3}, "launch": {"node_selector": {"pool": "gpu"}, "env": {}}, "x": None}) == {
        "data.batch_size": 3, "launch.node_selector.pool": "gpu", "x": None,
    }


def test_input_values_are_the_whole_input():
    """The one rule: kinds not given are empty (a preset's paths are not mixed in) unless kept."""
    assert input_values({"labelled": ["a"]}) == {f"shard.{k}": (["a"] if k == "labelled" else []) for k in INPUT_KINDS}
    kept = input_values({"labelled": ("a",), "captions": None}, keep={"captions", "labelled"})
    assert kept == {"shard.labelled": ["a"], "shard.unlabelled": [], "shard.eval_labelled": [], "shard.webdataset": []}
    cfg = load_config("demo", values=input_values({"webdataset": ["w/{0..1}.tar"]}))
    assert cfg.shard.webdataset == ("w/{0..1}.tar",) and cfg.shard.labelled == () and load_config("demo").shard.labelled
    with pytest.raises(ValueError, match=r"sources has kinds \['photos'\]; allowed kinds are \['labelled', 'captions'"):
        input_values({"photos": ["x"]})
    assert set(INPUT_KINDS) <= {f.name for f in dataclasses.fields(Config().shard)}
