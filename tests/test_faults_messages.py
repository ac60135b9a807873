"""Messages of issue #22 (item 8), each test named after its probe.

Before #22: a ``!!python/object/apply`` tag was refused as "section 'train' is a list"; a config
with 300k unknown keys gave one multi-megabyte error line; a full disk gave ``[Errno 28] No space
left on device`` naming no file (the local store) or a checkpoint save ended in safetensors'
``SafetensorError`` instead of a counted, one-line failure naming the staging folder.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from m3i.cli import main
from m3i.config import load_config
from m3i.config.core import from_dict, read_yaml_sections
from m3i.config.messages import MAX_MESSAGE, MAX_SHOWN
from m3i.config.train import TrainConfig
from m3i.storage import StorageError
from m3i.storage.local import LocalStore
from tests.helpers import one_rank_here
from tests.test_faults_checkpoint import _staged_files, _train, shards  # noqa: F401 (shards is a fixture)
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


# -- disk full names the path ------------------------------------------------------------------


@contextmanager
def file_size_limit(max_bytes: int):
    """Within it the kernel refuses any write past ``max_bytes`` of a file (EFBIG), as a full disk
    refuses one (ENOSPC): a real refusal of a real write, with no file name, needing no root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("call", ["put_bytes", "write_json", "put_file", "put_if_absent", "get_file"])
def test_disk_full_local_store_write_names_the_path(code, call, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 4096)
    store.put_bytes("in/src.bin", b"y" * 4096)
    dest = store.url("out/obj.bin") if call != "get_file" else str(tmp_path / "local" / "copy.bin")

    def full(fd):  # what fsync(2) answers when the data it must write has no room: errno, no file name
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        {
            "put_bytes": lambda: store.put_bytes("out/obj.bin", b"z" * 4096),
            "write_json": lambda: store.write_json("out/obj.bin", {"a": 1}),
            "put_file": lambda: store.put_file("out/obj.bin", str(src)),
            "put_if_absent": lambda: store.put_if_absent("out/obj.bin", b"z"),
            "get_file": lambda: store.get_file("in/src.bin", dest),
        }[call]()
    assert e.value.errno == code and e.value.filename == dest
    assert str(e.value) == f"[Errno {code}] {os.strerror(code)}: {dest!r}"
    assert not os.path.exists(dest) and not [p for p in os.listdir(os.path.dirname(dest)) if p.endswith(".tmp")]


def test_file_size_limit_local_store_write_names_the_path(tmp_path):
    """The kernel's own refusal, through the real write path: EFBIG past RLIMIT_FSIZE, no file name given."""
    store = LocalStore(tmp_path)
    with file_size_limit(64 * 1024):
        with pytest.raises(OSError) as e:
            store.put_bytes("run/history.jsonl", b"x" * (1 << 20))
    assert e.value.errno == errno.EFBIG and e.value.filename == str(tmp_path / "run" / "history.jsonl")
    assert store.stat("run/history.jsonl") is None


def test_read_error_of_a_source_is_not_blamed_on_the_written_file(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")

    class Failing:
        def read(self, n=-1):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(OSError) as e:
        store._atomic_write(tmp_path / "store" / "x", lambda f: f.write(Failing().read()))
    assert e.value.errno == errno.EIO and e.value.filename is None


@pytest.mark.slow
def test_disk_full_checkpoint_staging_is_a_counted_failure_naming_the_folder(shards, tmp_path, monkeypatch, caplog):  # noqa: F811
    """The rank state's safetensors write refused by the kernel mid-file (before #22 safetensors'
    SafetensorError escaped the save: not counted, a traceback, no folder)."""
    from m3i.train import checkpoint

    one_rank_here(monkeypatch)
    real_save_state = checkpoint.save_state

    def save_state_on_a_full_disk(state, path):
        with file_size_limit(256):
            real_save_state(state, path)

    monkeypatch.setattr(checkpoint, "save_state", save_state_on_a_full_disk)
    staging = tmp_path / "staging"
    with caplog.at_level(logging.ERROR, logger="m3i"), pytest.raises(StorageError) as e:
        _train(tmp_path, shards, tmp_path / "run", train={"steps": 4}, checkpoint={"interval_steps": 2, "max_consecutive_failures": 2})
    assert "checkpoint step 2 failed (1 in a row, checkpoint.max_consecutive_failures=2); training goes on" in caplog.text
    msg = str(e.value)
    assert msg.startswith(f"checkpoint step-00000004 not saved: writing its files to the staging folder {staging}/"), msg
    assert "bytes free there): " in msg and "File too large" in msg and "\n" not in msg
    assert _staged_files(tmp_path) == []
