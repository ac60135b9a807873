"""A seeded fuzz of `m3i shard` inputs (issue #22): odd source names and file kinds, caption rows, tar members.

Each example builds a folder source, a caption file and a WebDataset tar from a seeded random mix
of good and hostile entries, with the outcome of each entry known by construction. The run must
end (a watchdog alarm fails it instead of a hang), list exactly the bad inputs, shard exactly the
good ones, and publish an index that `m3i shard --verify` finds consistent with the shards on disk;
a re-run must reuse every unit and list the same bad inputs.
"""

import json
import os
import random
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

import m3i.shard.run
from m3i.config import ShardConfig
from m3i.shard import read_index, shard, verify
from m3i.shard.lock import OutputLock
from m3i.storage import open_store
from tests.helpers import read_tar
from tests.hostile import TarBuilder, escaped, jpeg, make_socket

SEEDS = range(16)
CAP = 64 * 1024  # shard.max_input_bytes for the fuzz: an over-cap file costs little to make
WATCHDOG_S = 120  # a hang guard only: one example runs in well under a second


@dataclass
class Expect:
    good: set[str] = field(default_factory=set)
    """Ids that must be sharded, one sample each."""
    bad: set[str] = field(default_factory=set)
    """Ids that must be listed as bad."""
    classes: set[str] = field(default_factory=set)


NAME_PARTS = ["a", "Zebra", "with space", "é-accent", "中文", "emoji-😀", "100%", "semi;colon", "quote'", "x" * 120, "dash-", "UP"]


def _name(rng: random.Random, used: set[str], ext: str = ".jpg") -> str:
    while True:
        n = f"{rng.choice(NAME_PARTS)}{rng.randrange(1000)}{rng.choice([ext, ext.upper()])}"
        if n.lower() not in used:  # case-insensitive file systems are out of scope; names stay distinct anyway
            used.add(n.lower())
            return n


def _folder(rng: random.Random, root: Path, e: Expect) -> None:
    """An unlabelled folder: each entry good, bad by its bytes, bad by its kind, or bad by its name."""
    root.mkdir(parents=True)
    used: set[str] = set()
    good_files = []
    prefix = root.name
    for i in range(rng.randrange(4, 14)):
        kind = rng.choice(["good", "good", "good", "garbage", "truncated", "empty", "fifo", "socket", "dir", "loop",
                           "dangling", "outside", "inside", "oversize", "non_utf8", "hidden", "text"])
        name = _name(rng, used)
        path = root / name
        rid = f"{prefix}/{name}"
        if kind == "good":
            path.write_bytes(jpeg(rng.randrange(10_000)))
            good_files.append(name)
            e.good.add(rid)
        elif kind in ("garbage", "empty", "truncated", "oversize"):
            data = {"garbage": b"not an image at all", "empty": b"", "truncated": jpeg(i)[:100], "oversize": b"\xff" * (CAP + 1)}[kind]
            path.write_bytes(data)
            e.bad.add(rid)
        elif kind == "fifo":
            os.mkfifo(path)
            e.bad.add(rid)
        elif kind == "socket":
            short = f"s{i}.jpg"  # a socket path must fit in 108 bytes
            if short.lower() in used:
                continue
            used.add(short.lower())
            make_socket(root / short)
            e.bad.add(f"{prefix}/{short}")
        elif kind == "dir":  # a folder named like an image is a folder: searched, its images are inputs
            path.mkdir()
            (path / "inner.jpg").write_bytes(jpeg(i + 500))
            e.good.add(f"{rid}/inner.jpg")
        elif kind == "loop":
            os.symlink(path, path)
            e.bad.add(rid)
        elif kind == "dangling":
            os.symlink(root / "nowhere" / "x.jpg", path)
            e.bad.add(rid)
        elif kind == "outside":
            os.symlink("/etc/hostname", path)
            e.bad.add(rid)
        elif kind == "inside" and good_files:
            os.symlink(root / good_files[0], path)
            e.good.add(rid)
        elif kind == "non_utf8":
            raw = b"bad-\xff\xfe" + str(i).encode() + b".jpg"
            with open(os.path.join(os.fsencode(root), raw), "wb") as f:
                f.write(jpeg(i))
            e.bad.add(f"{prefix}/{escaped(raw)}")
        elif kind == "hidden":
            (root / f".{name}").write_bytes(b"ignored: hidden")
        elif kind == "text":
            (root / f"{name}.txt").write_text("ignored: not an image name")


def _captions(rng: random.Random, folder: Path, e: Expect) -> Path:
    """A JSONL caption file: good rows and every kind of bad row, line numbers tracked."""
    img = folder / "img"
    img.mkdir(parents=True)
    files = []
    for i in range(4):
        (img / f"{i}.jpg").write_bytes(jpeg(2000 + i))
        files.append(f"img/{i}.jpg")
    (img / "broken.jpg").write_bytes(b"garbage")
    os.mkfifo(img / "pipe.jpg")
    lines: list[str] = []
    used: set[str] = set()

    def row(image, caption="a caption") -> str:
        return json.dumps({"image": image, "caption": caption})

    for _ in range(rng.randrange(4, 14)):
        kind = rng.choice(["good", "good", "dup", "nul", "surrogate", "missing", "outside", "notjson", "nocaption",
                           "notobject", "deep", "bigint", "fifo", "undecodable", "blank"])
        n = len(lines) + 1
        bad_line = f"caps.jsonl:{n}"
        if kind == "good":
            unused = [f for f in files if f not in used]
            if not unused:
                continue
            f = rng.choice(unused)
            used.add(f)
            lines.append(row(rng.choice([f, "./" + f, "img/../" + f])))
            e.good.add(f"caps.jsonl/{f}")
        elif kind == "dup" and used:
            lines.append(row("./" + rng.choice(sorted(used))))
            e.bad.add(bad_line)
        elif kind == "nul":
            lines.append(row("img/0.jpg\u0000x"))
            e.bad.add(bad_line)
        elif kind == "surrogate":
            lines.append('{"image": "img/3.jpg", "caption": "lone \\udc80 surrogate"}')
            e.bad.add(bad_line)
        elif kind in ("missing", "outside", "fifo"):
            lines.append(row({"missing": "img/none.jpg", "outside": "../elsewhere.jpg", "fifo": "img/pipe.jpg"}[kind]))
            e.bad.add(bad_line)
        elif kind == "notjson":
            lines.append('{"image": "img/0.jpg", caption')
            e.bad.add(bad_line)
        elif kind == "nocaption":
            lines.append(json.dumps({"image": "img/1.jpg"}))
            e.bad.add(bad_line)
        elif kind == "notobject":
            lines.append("[1, 2, 3]")
            e.bad.add(bad_line)
        elif kind == "deep":
            lines.append("[" * 100_000 + "]" * 100_000)
            e.bad.add(bad_line)
        elif kind == "bigint":
            lines.append('{"image": "img/0.jpg", "caption": "x", "n": ' + "9" * 5000 + "}")
            e.bad.add(bad_line)
        elif kind == "undecodable" and "img/broken.jpg" not in used:
            used.add("img/broken.jpg")
            lines.append(row("img/broken.jpg"))
            e.bad.add("caps.jsonl/img/broken.jpg")  # listed by its id: it fails to decode, after discovery
        elif kind == "blank":
            lines.append("")
    (folder / "elsewhere.jpg").write_bytes(jpeg(7))
    caps = folder / "caps.jsonl"
    caps.write_text("".join(line + "\n" for line in lines))
    return caps


def _tar(rng: random.Random, path: Path, e: Expect) -> Path:
    """A WebDataset tar whose samples are each good, or bad in one way, and members of every kind."""
    b = TarBuilder()
    tid = f"{path.parent.name}/{path.name}"
    for i in range(rng.randrange(3, 12)):
        key = f"{i:06d}"
        sid = f"{tid}:{key}"
        kind = rng.choice(["text", "label", "plain", "garbage", "symlink_first", "hardlink", "fifo", "dup", "big_cls",
                           "no_image", "non_utf8", "sparse", "surrogate_json"])
        img = jpeg(3000 + i)
        if kind == "text":
            b.file(f"{key}.jpg", img).file(f"{key}.txt", f"caption {i}".encode())
            e.good.add(sid)
        elif kind == "label":
            cls = rng.choice(["3", "7"])
            b.file(f"{key}.jpg", img).file(f"{key}.cls", cls.encode())
            e.good.add(sid)
            e.classes.add(cls)
        elif kind == "plain":
            b.file(f"{key}.jpg", img)
            e.good.add(sid)
        elif kind == "garbage":
            b.file(f"{key}.jpg", b"not a jpeg").file(f"{key}.txt", b"x")
            e.bad.add(sid)
        elif kind == "symlink_first":
            b.symlink(f"{key}.jpg", "/etc/passwd").file(f"{key}.jpg", img)
            e.good.add(sid)
            e.bad.add(f"{tid}:{key}.jpg")
        elif kind in ("hardlink", "fifo"):
            b.hardlink(f"{key}.jpg", "000000.jpg") if kind == "hardlink" else b.fifo(f"{key}.jpg")
            e.bad.add(f"{tid}:{key}.jpg")
        elif kind == "dup":
            b.file(f"{key}.jpg", img).file(f"{key}.jpg", b"second")
            e.good.add(sid)
            e.bad.add(f"{tid}:{key}.jpg")
        elif kind == "big_cls":
            b.file(f"{key}.jpg", img).file(f"{key}.cls", b"1" * ((1 << 20) + 1))
            e.bad.add(sid)
        elif kind == "no_image":
            b.file(f"{key}.txt", b"only text")
            e.bad.add(sid)
        elif kind == "non_utf8":
            raw = f"{key}-\udcff.jpg"
            b.file(raw, img)
            e.bad.add(f"{tid}:{escaped(raw.encode('utf-8', 'surrogateescape'))}")
        elif kind == "sparse":
            b.sparse(f"{key}.jpg", rng.choice([CAP + 1, 8 << 30, 1 << 40]))
            e.bad.add(sid)
        elif kind == "surrogate_json":
            b.file(f"{key}.jpg", img).file(f"{key}.json", b'{"caption": "lone \\ud800"}')
            e.bad.add(sid)
    return b.write(path)


def _labelled(rng: random.Random, root: Path, e: Expect) -> None:
    """Class folders: ordinary, empty (not a class), and one whose name is not UTF-8 (its images bad)."""
    for c in rng.sample(["cat", "dog", "owl", "émeu"], 2):
        for i in range(rng.randrange(1, 3)):
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / f"{i}.jpg").write_bytes(jpeg(4000 + i))
            e.good.add(f"{root.name}/{c}/{i}.jpg")
        e.classes.add(c)
    (root / "empty").mkdir()
    if rng.random() < 0.5:
        odd = os.path.join(os.fsencode(root), b"cl\xe4ss")
        os.mkdir(odd)
        with open(os.path.join(odd, b"0.jpg"), "wb") as f:
            f.write(jpeg(4100))
        e.bad.add(root.name + "/" + escaped(b"cl\xe4ss") + "/0.jpg")


def _alarm(signum, frame):
    raise TimeoutError(f"m3i shard did not end within {WATCHDOG_S}s (hung)")


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_inputs_end_list_every_bad_input_and_publish_a_consistent_index(seed, tmp_path, monkeypatch):
    # No settle wait for the lock: each example has its own output, so no run races another here.
    monkeypatch.setattr(m3i.shard.run, "OutputLock", partial(OutputLock, settle_seconds=0.0))
    rng = random.Random(seed)
    e = Expect()
    _folder(rng, tmp_path / "in" / f"src {rng.choice(NAME_PARTS)[:20]}", e)
    folder = next((tmp_path / "in").iterdir())
    caps = _captions(rng, tmp_path / "c", e)
    tar = _tar(rng, tmp_path / "w" / "00000.tar", e)
    _labelled(rng, tmp_path / "lab", e)
    out = tmp_path / "out"
    cfg = ShardConfig(
        out=str(out), unlabelled=(str(folder),), captions=(str(caps),), webdataset=(str(tar),), labelled=(str(tmp_path / "lab"),),
        max_input_bytes=CAP, max_bad_fraction=1.0, max_samples_per_shard=rng.choice([3, 7, 100]), workers=1,
    )
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(WATCHDOG_S)
    try:
        index = shard(cfg, progress=False)
        again = shard(cfg, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

    listed = [b["id"] for b in index.raw["bad"]["items"]]
    assert sorted(set(listed)) == sorted(e.bad), f"seed {seed}: listed vs expected bad"
    assert len(listed) == len(set(listed)), f"seed {seed}: a bad input listed twice: {listed}"
    for b in index.raw["bad"]["items"]:
        assert b["reason"] and b["reason"].isprintable() and b["id"].encode("utf-8"), b
    sample_ids = []
    for split in index.splits:
        for s in index.shards(split):
            sample_ids += [json.loads(m["json"])["id"] for m in read_tar(out / s.key).values()]
    assert sorted(sample_ids) == sorted(e.good), f"seed {seed}: sharded vs expected good"
    assert set(index.classes) == e.classes
    check = verify(str(out))
    assert check.ok and check.shards == sum(len(v) for v in index.splits.values()) and not check.unlisted, check
    assert again.raw["run"]["units_written"] == 0 and again.raw["bad"] == index.raw["bad"]
    assert read_index(open_store(str(out))).raw["splits"] == index.raw["splits"]
