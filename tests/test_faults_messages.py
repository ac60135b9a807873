"""Messages of issue #22 (item 8), each test named after its probe.

Before #22: a ``!!python/object/apply`` tag was refused as "section 'train' is a list"; a config
with 300k unknown keys gave one multi-megabyte error line; a full disk gave ``[Errno 28] No space
left on device`` naming no file (the local store) or a checkpoint save ended in safetensors'
``SafetensorError`` instead of a counted, one-line failure naming the staging folder.
"""

from __future__ import annotations

import errno
import os

import pytest

from m3i.cli import main
from m3i.config import load_config
from m3i.config.core import from_dict, read_yaml_sections
from m3i.config.messages import MAX_MESSAGE, MAX_SHOWN
from m3i.config.train import TrainConfig
from tests.test_faults_config import _one_error_line

TAG_WORDS = "is not allowed; expected plain YAML (mappings, lists, strings, numbers, booleans): m3i builds no Python objects"


# -- YAML tags ---------------------------------------------------------------------------------


def test_yaml_python_object_apply_tag_is_named_not_called_a_list(tmp_path, capsys):
    bad = tmp_path / "evil.yaml"
    bad.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["train", "--config", str(bad)]) == 2
    line = _one_error_line(capsys, "train")
    assert f"{bad}: line 1, column 8: the YAML tag '!!python/object/apply:os.system' {TAG_WORDS}" in line, line
    assert "is a list" not in line
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


@pytest.mark.parametrize(
    "text, where, tag",
    [
        ("data:\n  batch_size: !custom 3\n", "line 2, column 15", "!custom"),
        ("!!python/object/new:dict {}\n", "line 1, column 1", "!!python/object/new:dict"),
        ("base: &b {lr: !!python/name:os.system ''}\ntrain: *b\n", "line 1, column 15", "!!python/name:os.system"),
        ("train:\n  betas: [0.9, !!python/tuple [1, 2]]\n", "line 2, column 16", "!!python/tuple"),
        ("data:\n  batch_size: 8\ntrain: !<tag:example.com,2026:x> {}\n", "line 3, column 8", "tag:example.com,2026:x"),
    ],
    ids=["local-tag-value", "top-level", "behind-an-alias", "in-a-list", "verbatim-section"],
)
def test_yaml_tag_anywhere_is_named(text, where, tag):
    with pytest.raises(ValueError) as e:
        read_yaml_sections(text, "f.yaml")
    assert str(e.value) == f"f.yaml: {where}: the YAML tag {tag!r} {TAG_WORDS} and reads no custom tags, so remove the tag (or quote a value meant as text)"


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [ls]", "[1, !!python/object/apply:os.system [ls]]"])
def test_yaml_tag_in_a_set_value_is_named(value, capsys):
    # launch --dryrun: were the value taken (as before #22, as text), nothing would start.
    assert main(["launch", "--dryrun", "--set", f"train.run_id={value}"]) == 2
    line = _one_error_line(capsys, "launch")
    assert "the YAML tag '!!python/object/apply:os.system' is not allowed" in line and "quote a value meant as text" in line


def test_yaml_plain_tags_and_quoted_bangs_still_load():
    cfg = load_config(None, None, ['train.run_id="!nightly"', "train.lr=!!float 1", "train.betas=!!seq [0.9, 0.99]"])
    assert (cfg.train.run_id, cfg.train.lr, cfg.train.betas) == ("!nightly", 1.0, (0.9, 0.99))
    assert read_yaml_sections("base: &b {lr: 0.5}\ntrain:\n  <<: *b\n  steps: !!int '7'\n", "f")["train"] == {"lr": 0.5, "steps": 7}


# -- error lines capped ------------------------------------------------------------------------


def test_300k_unknown_keys_give_one_short_line():
    data = {f"k{i:06d}": 1 for i in range(300_000)}
    with pytest.raises(ValueError) as e:
        from_dict(TrainConfig, data, section="config.train")
    msg = str(e.value)
    assert len(msg) < MAX_MESSAGE and "\n" not in msg
    names = ", ".join(repr(f"k{i:06d}") for i in range(10))
    assert msg.startswith(f"config.train: unknown key(s) [{names}] and 299990 more; allowed keys are ['allgather_bucket_size'")


def test_many_unknown_keys_in_a_config_file_give_one_short_line(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("train:\n" + "".join(f"  k{i}: 1\n" for i in range(3000)) + "  lr: 0.1\n")
    assert main(["train", "--config", str(big)]) == 2
    line = _one_error_line(capsys, "train")
    assert len(line) < MAX_MESSAGE and "and 2990 more; allowed keys are" in line


@pytest.mark.parametrize(
    "override, start",
    [
        ("train.lr=" + "9" * 1_000_000, "config.train.lr="),
        ("train.steps=[" + "1, " * 200_000 + "1]", "config.train.steps=["),
        ("launch.kind=" + "x" * 1_000_000, "launch.kind='xxx"),
        ("launch.image=" + "a" * 1_000_000, "launch.image='aaa"),
        ("train." + "k" * 1_000_000 + "=1", "config.train: unknown key(s) ['kkk"),
    ],
    ids=["huge-number", "huge-list", "huge-choice", "huge-image", "huge-key"],
)
def test_huge_value_or_key_gives_one_short_line(override, start, capsys):
    assert main(["train", "--set", override]) == 2
    line = _one_error_line(capsys, "train")
    assert len(line) < MAX_MESSAGE + 100 and line.removeprefix("m3i train: error: ").startswith(start), line[:300]
    assert "more characters)" in line or "characters left out" in line


def test_short_messages_are_unchanged():
    with pytest.raises(ValueError, match=r"^config\.train: unknown key\(s\) \['bogus'\]; allowed keys are \['allgather"):
        load_config(None, None, ["train.bogus=1"])
    with pytest.raises(ValueError, match=r"^launch\.kind='slurm' is not allowed; choose one of \['volcano'"):
        load_config(None, None, ["launch.kind=slurm"])
    assert MAX_SHOWN >= 200  # a real value (an image reference, a path) is shown whole
