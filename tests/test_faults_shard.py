"""Faults of `m3i shard` (issue #14): a failed or concurrent run never damages a published data set,
caption paths stay inside their folder, bad symlinks are skipped and listed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3i.config import ShardConfig
from m3i.shard import INDEX_KEY, OutputLocked, ShardError, read_index, shard
from m3i.shard.lock import LOCK_KEY, OutputLock
from m3i.storage import open_store
from tests.helpers import read_tar, small_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo"))


def _assert_index_verifies(out: Path) -> int:
    """Every shard the index lists is there with its checksum and sample count; returns the samples."""
    store = open_store(str(out))
    index = read_index(store)
    total = 0
    for split in index.splits:
        for s in index.shards(split):
            assert store.sha256(s.key) == s.sha256, f"{s.key} does not match the index"
            assert len(read_tar(out / s.key)) == s.samples
            total += s.samples
    return total


def _garbage_folder(root: Path, n: int) -> Path:
    for i in range(n):
        (root / "junk" / f"{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / "junk" / f"{i}.jpg").write_bytes(b"not an image %d" % i)
    return root


def test_failed_shard_run_into_a_published_data_set_leaves_it_intact(demo, tmp_path):
    out = tmp_path / "out"
    first = shard(ShardConfig(out=str(out), labelled=(demo["labelled"],), max_samples_per_shard=16), progress=False)
    before = (out / INDEX_KEY).read_bytes()
    listed = {s.key for s in first.shards("train")}
    # The same unit numbers, other inputs, mostly bad: the run stops above max_bad_fraction.
    raw = _garbage_folder(tmp_path / "bad", 40)
    for p in sorted(Path(demo["unlabelled"]).glob("*.jpg"))[:3]:  # a few good ones: the unit writes a shard
        (raw / "junk" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ShardError, match="No index was written"):
        shard(ShardConfig(out=str(out), unlabelled=(str(raw / "junk"),), max_samples_per_shard=16), progress=False)
    assert (out / INDEX_KEY).read_bytes() == before
    assert _assert_index_verifies(out) == first.num_samples("train")
    assert listed <= {p.relative_to(out).as_posix() for p in (out / "train").glob("*.tar")}
    assert not (out / LOCK_KEY).exists()


def test_republish_keeps_the_replaced_index_shards_until_the_next_publish(demo, tmp_path):
    out = tmp_path / "out"
    a = shard(ShardConfig(out=str(out), labelled=(demo["labelled"],), max_samples_per_shard=16), progress=False)
    b = shard(ShardConfig(out=str(out), unlabelled=(demo["unlabelled"],), max_samples_per_shard=16), progress=False)
    keys_a = {s.key for s in a.shards("train")}
    keys_b = {s.key for s in b.shards("train")}
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*.tar")}
    assert keys_a.isdisjoint(keys_b)
    assert keys_a | keys_b == on_disk  # a reader that opened index A still finds its shards
    shard(ShardConfig(out=str(out), unlabelled=(demo["unlabelled"],), max_samples_per_shard=8), progress=False)
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*.tar")}
    assert keys_a.isdisjoint(on_disk)  # two publishes later, A's shards are collected
    _assert_index_verifies(out)


def test_concurrent_shard_runs_into_one_output_are_refused_while_locked(demo, tmp_path):
    out = tmp_path / "out"
    store = open_store(str(out))
    with OutputLock(store, stale_seconds=600, settle_seconds=0.05):
        with pytest.raises(OutputLocked, match=r"being written by another run \(host .*, pid \d+.*shard.lock_stale_seconds=600"):
            shard(ShardConfig(out=str(out), labelled=(demo["labelled"],)), progress=False)
        assert not (out / INDEX_KEY).exists() and not list(out.glob("*/*.tar"))
    # A stale lock (its owner died without releasing) is taken over.
    store.write_json(LOCK_KEY, {"host": "gone", "pid": 1, "token": "x", "refreshed_unix": time.time() - 3600})
    shard(ShardConfig(out=str(out), labelled=(demo["labelled"],), lock_stale_seconds=60), progress=False)
    assert not (out / LOCK_KEY).exists()
    _assert_index_verifies(out)


@pytest.mark.slow
def test_two_concurrent_shard_processes_never_leave_a_mismatched_index(demo, tmp_path):
    out = tmp_path / "out"
    cmds = [
        [sys.executable, "-m", "m3i", "-q", "shard", "--out", str(out), "--labelled", demo["labelled"], "--set", "shard.max_samples_per_shard=8"],
        [sys.executable, "-m", "m3i", "-q", "shard", "--out", str(out), "--unlabelled", demo["unlabelled"], "--set", "shard.max_samples_per_shard=8"],
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    try:
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [r[0] for r in results]
    assert 0 in codes, results
    for code, err in results:
        assert code == 0 or "being written by another run" in err, results
    _assert_index_verifies(out)
    assert not (out / LOCK_KEY).exists()


def test_caption_paths_outside_the_caption_folder_are_not_read(demo, tmp_path):
    caps_dir = tmp_path / "caps"
    (caps_dir / "img").mkdir(parents=True)
    src = sorted(Path(demo["unlabelled"]).glob("*.jpg"))
    (caps_dir / "img" / "inside.jpg").write_bytes(src[0].read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(src[1].read_bytes())
    os.symlink(outside / "x.jpg", caps_dir / "img" / "link-out.jpg")
    rows = [
        {"image": "img/inside.jpg", "caption": "fine"},
        {"image": "../outside/x.jpg", "caption": "climbs out"},
        {"image": "/etc/passwd", "caption": "absolute"},
        {"image": "img/link-out.jpg", "caption": "a link that leads out"},
    ]
    caps = caps_dir / "caps.jsonl"
    caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = shard(ShardConfig(out=str(tmp_path / "o"), captions=(str(caps),), max_bad_fraction=0.9), progress=False)
    assert index.raw["totals"]["sources"] == {"captioned": 1}
    reasons = {b["id"]: b["reason"] for b in index.raw["bad"]["items"]}
    assert set(reasons) == {"caps.jsonl:2", "caps.jsonl:3", "caps.jsonl:4"}
    assert all("outside the caption file's folder" in r for r in reasons.values()), reasons
    # Allowed explicitly, a relative path out is read (/etc/passwd is then only "not an image").
    allowed = shard(
        ShardConfig(out=str(tmp_path / "o2"), captions=(str(caps),), max_bad_fraction=0.9, allow_outside_paths=True), progress=False
    )
    # img/link-out.jpg leads to the file ../outside/x.jpg names: one sample, the second row listed.
    assert allowed.raw["totals"]["sources"] == {"captioned": 3 - 1}
    assert {b["id"]: b["reason"] for b in allowed.raw["bad"]["items"]}["caps.jsonl:4"] == "line 4 names the same file as line 2"


def test_bad_symlinks_are_skipped_and_listed_not_fatal(demo, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    good = sorted(Path(demo["unlabelled"]).glob("*.jpg"))[:4]
    for p in good:
        (root / p.name).write_bytes(p.read_bytes())
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    os.symlink(tmp_path / "nowhere.jpg", root / "dangling.jpg")
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(good[0].read_bytes())
    os.symlink(elsewhere, root / "leaves.jpg")
    os.symlink(root / good[1].name, root / "inside-link.jpg")  # a link that stays inside is an input
    index = shard(ShardConfig(out=str(tmp_path / "o"), unlabelled=(str(root),), max_bad_fraction=0.9), progress=False)
    assert index.raw["totals"]["sources"] == {"unlabelled": 5}
    reasons = {b["id"]: b["reason"] for b in index.raw["bad"]["items"]}
    assert reasons == {
        "imgs/loop-a.jpg": "symlink loop",
        "imgs/loop-b.jpg": "symlink loop",
        "imgs/dangling.jpg": "dangling symlink",
        "imgs/leaves.jpg": "symlink leads outside the input folder",
    }
