"""Hostile inputs to `m3i shard` (issue #22): no hang, no unbounded read, no odd name that ends the run,
no published data set a re-run cannot repair. Each test is named after the probe that broke main."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3i.config import ShardConfig
from m3i.shard import INDEX_KEY, OutputLocked, read_index, shard, verify
from m3i.shard.lock import LOCK_KEY, _machine
from m3i.storage import open_store
from m3i.storage.local import LocalStore
from tests.helpers import read_tar
from tests.hostile import GIB, TarBuilder, escaped, jpeg, make_socket, mkdir_bytes, run_cli, write_bytes_name


def _bad(index) -> dict[str, str]:
    return {b["id"]: b["reason"] for b in index.raw["bad"]["items"]}


def _sample_ids(out: Path, index) -> list[str]:
    ids = []
    for split in index.splits:
        for s in index.shards(split):
            ids += [json.loads(m["json"])["id"] for m in read_tar(out / s.key).values()]
    return sorted(ids)


def _images(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))


def test_fifo_in_an_input_folder_does_not_hang_the_run(tmp_path):
    imgs = tmp_path / "imgs"
    _images(imgs, 3)
    os.mkfifo(imgs / "pipe.jpg")  # no writer ever opens it: a read would block forever
    make_socket(imgs / "sock.jpg")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        json.dumps({"image": "imgs/0.jpg", "caption": "fine"}) + "\n"
        + json.dumps({"image": "imgs/pipe.jpg", "caption": "a FIFO through a caption row"}) + "\n"
        + json.dumps({"image": "imgs", "caption": "a folder"}) + "\n"
    )
    rc, out, err, _ = run_cli(
        ["-q", "shard", "--unlabelled", str(imgs), "--captions", str(caps), "--out", str(tmp_path / "o"),
         "--set", "shard.max_bad_fraction=0.9"],
        cwd=tmp_path,
    )
    assert rc == 0, err
    index = read_index(open_store(str(tmp_path / "o")))
    assert _bad(index) == {
        "imgs/pipe.jpg": "not a regular file (FIFO)",
        "imgs/sock.jpg": "not a regular file (socket)",
        "caps.jsonl:2": "not a regular file (FIFO)",
        "caps.jsonl:3": "not a regular file (directory)",
    }
    assert index.raw["totals"]["sources"] == {"unlabelled": 3, "captioned": 1}


def test_char_device_named_x_jpg_is_listed_not_read(tmp_path):
    """A `/dev/zero`-like device is refused unread: through a caption row always; as a file of an input
    folder too where this process may create device nodes (root with CAP_MKNOD, as on the dev machine)."""
    imgs = tmp_path / "imgs"
    _images(imgs, 2)
    expected = {"caps.jsonl:2": "not a regular file (character device)"}
    try:
        os.mknod(imgs / "x.jpg", 0o644 | 0o020000, os.makedev(1, 5))  # S_IFCHR, the numbers of /dev/zero
        expected["imgs/x.jpg"] = "not a regular file (character device)"
    except PermissionError:
        pass  # no CAP_MKNOD here: the caption row below still reaches a real /dev/zero
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        json.dumps({"image": "imgs/0.jpg", "caption": "fine"}) + "\n" + json.dumps({"image": "/dev/zero", "caption": "zeros"}) + "\n"
    )
    rc, out, err, _ = run_cli(
        ["-q", "shard", "--unlabelled", str(imgs), "--captions", str(caps), "--out", str(tmp_path / "o"),
         "--set", "shard.max_bad_fraction=0.9", "--set", "shard.allow_outside_paths=true"],
        cwd=tmp_path, mem_bytes=2 * GIB,
    )
    assert rc == 0, err[-3000:]
    index = read_index(open_store(str(tmp_path / "o")))
    assert _bad(index) == expected


def _sparse_tar(path: Path) -> Path:
    return (
        TarBuilder()
        .file("00000000.jpg", jpeg(0)).file("00000000.txt", b"before")
        .sparse("00000001.jpg", 8 * GIB).file("00000001.txt", b"claims 8 GiB")
        .file("00000002.jpg", jpeg(2)).file("00000002.txt", b"after")
        .write(path)
    )


def test_sparse_8gib_tar_member_is_refused_before_it_is_read(tmp_path):
    tar = _sparse_tar(tmp_path / "w" / "sparse.tar")
    assert tar.stat().st_size < 16 * 1024
    cap = 64 * 1024 * 1024
    common = ["--set", f"shard.max_input_bytes={cap}", "--set", "shard.max_bad_fraction=0.5", "--set", "shard.workers=1"]
    # The baseline: the same command over a tar of the two ordinary samples alone.
    plain = TarBuilder().file("00000000.jpg", jpeg(0)).file("00000000.txt", b"x").file("00000002.jpg", jpeg(2)).write(tmp_path / "w" / "plain.tar")
    rc0, _, err0, base_rss = run_cli(["-q", "shard", "--webdataset", str(plain), "--out", str(tmp_path / "o0"), *common], cwd=tmp_path)
    assert rc0 == 0, err0[-3000:]
    rc, out, err, peak = run_cli(["-q", "shard", "--webdataset", str(tar), "--out", str(tmp_path / "o"), *common], cwd=tmp_path)
    assert rc == 0, err[-3000:]
    index = read_index(open_store(str(tmp_path / "o")))
    assert _bad(index) == {"w/sparse.tar:00000001": f"too large (8589934592 bytes > shard.max_input_bytes={cap})"}
    assert index.raw["totals"]["samples"] == 2
    # Memory: the run over the 8 GiB claim stays within the cap of the same run without it.
    assert 0 < peak < base_rss + cap, (peak, base_rss)


def test_rerun_rewrites_a_published_shard_whose_bytes_were_changed(tmp_path):
    imgs = tmp_path / "imgs"
    _images(imgs, 30)
    out = tmp_path / "o"
    cfg = ShardConfig(out=str(out), unlabelled=(str(imgs),), max_samples_per_shard=8, workers=1)
    first = shard(cfg, progress=False)
    victim = first.shards("train")[1]
    path = out / victim.key
    data = bytearray(path.read_bytes())
    data[700:704] = b"\xde\xad\xbe\xef" if data[700:704] != b"\xde\xad\xbe\xef" else b"\0\0\0\0"
    path.write_bytes(bytes(data))  # same size; the checksum file beside it still says the old sha256
    second = shard(cfg, progress=False)
    assert second.raw["run"]["units_written"] == 1 and second.raw["run"]["shards_repaired"] == [victim.key]
    assert verify(str(out)).ok
    for s in read_index(open_store(str(out))).shards("train"):
        assert open_store(str(out)).sha256(s.key) == s.sha256


def test_shard_verify_reports_a_damaged_or_missing_shard_and_exits_1(tmp_path):
    imgs = tmp_path / "imgs"
    _images(imgs, 20)
    out = tmp_path / "o"
    shard(ShardConfig(out=str(out), unlabelled=(str(imgs),), max_samples_per_shard=8, workers=1), progress=False)
    cmd = [sys.executable, "-m", "m3i", "shard", "--verify", "--out", str(out)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ": ok" in ok.stdout, ok.stdout + ok.stderr
    keys = [s.key for s in read_index(open_store(str(out))).shards("train")]
    data = bytearray((out / keys[0]).read_bytes())
    data[600] ^= 0xFF
    (out / keys[0]).write_bytes(bytes(data))
    (out / keys[1]).unlink()
    (out / "train" / "train-09999-00-000000000000.tar").write_bytes(b"left over")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"damaged: {keys[0]}: sha256 " in bad.stdout and f"damaged: {keys[1]}: missing" in bad.stdout
    assert "not listed (" in bad.stdout and "train/train-09999-00-000000000000.tar" in bad.stdout
    assert "DAMAGED: 2 of 3 shards" in bad.stdout
    (out / INDEX_KEY).write_text("{not json")
    broken = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1 and "index.json" in broken.stderr


def test_non_utf8_file_name_is_one_bad_input(tmp_path):
    imgs = tmp_path / "imgs"
    _images(imgs, 3)
    write_bytes_name(imgs, b"caf\xe9.jpg", jpeg(9))
    sub = mkdir_bytes(imgs, b"d\xff")
    (sub / "in.jpg").write_bytes(jpeg(10))
    index = shard(ShardConfig(out=str(tmp_path / "o"), unlabelled=(str(imgs),), max_bad_fraction=0.5), progress=False)
    assert _bad(index) == {
        "imgs/" + escaped(b"caf\xe9.jpg"): "file name is not valid UTF-8",
        "imgs/" + escaped(b"d\xff/in.jpg"): "file name is not valid UTF-8",
    }
    assert escaped(b"caf\xe9.jpg") == "caf\\xe9.jpg"  # the bytes, escaped: the same on every run
    assert index.raw["totals"]["samples"] == 3


def test_non_utf8_class_folder_name_is_bad_inputs_not_a_failed_run(tmp_path):
    root = tmp_path / "lab"
    _images(root / "cat", 2)
    odd = mkdir_bytes(root, b"d\xf6g")
    _images(odd, 2)
    index = shard(ShardConfig(out=str(tmp_path / "o"), labelled=(str(root),), max_bad_fraction=0.9), progress=False)
    assert index.classes == ["cat"]
    assert _bad(index) == {f"lab/d\\xf6g/{i}.jpg": "class folder name is not valid UTF-8" for i in range(2)}


def _caption_folder(tmp_path: Path, lines: list[str]) -> Path:
    _images(tmp_path / "c" / "img", 3)
    caps = tmp_path / "c" / "caps.jsonl"
    caps.write_text("".join(line + "\n" for line in lines))
    return caps


def test_nul_byte_in_a_caption_image_path_is_one_bad_input(tmp_path):
    caps = _caption_folder(tmp_path, [
        json.dumps({"image": "img/0.jpg", "caption": "fine"}),
        json.dumps({"image": "img/1.jpg\u0000.png", "caption": "NUL in the path"}),
        json.dumps({"image": "img/2.jpg", "caption": "a NUL \u0000 in a caption is only text"}),
    ])
    index = shard(ShardConfig(out=str(tmp_path / "o"), captions=(str(caps),), max_bad_fraction=0.5), progress=False)
    assert _bad(index) == {"caps.jsonl:2": "line 2: the image path holds a NUL byte"}
    assert index.raw["totals"]["samples"] == 2


def test_lone_surrogate_in_a_json_caption_is_one_bad_input(tmp_path):
    caps = _caption_folder(tmp_path, [
        '{"image": "img/0.jpg", "caption": "fine"}',
        '{"image": "img/1.jpg", "caption": "half a pair \\ud800 here"}',  # valid JSON, not valid Unicode
        '{"image": "img/\\udce9.jpg", "caption": "a surrogate in the path"}',
        '{"image": "img/2.jpg", "caption": "a real pair \\ud83d\\ude00 is fine"}',
    ])
    index = shard(ShardConfig(out=str(tmp_path / "o"), captions=(str(caps),), max_bad_fraction=0.6), progress=False)
    assert _bad(index) == {
        "caps.jsonl:2": "line 2: the caption is not valid Unicode (a lone surrogate)",
        "caps.jsonl:3": "line 3: the image path is not valid Unicode (a lone surrogate)",
    }
    assert index.raw["totals"]["samples"] == 2


def test_paths_that_normalise_to_the_same_file_are_one_sample(tmp_path):
    caps = _caption_folder(tmp_path, [
        json.dumps({"image": "./img/0.jpg", "caption": "first"}),
        json.dumps({"image": "img/0.jpg", "caption": "the same file"}),
        json.dumps({"image": "img/../img//0.jpg", "caption": "the same file again"}),
        json.dumps({"image": "img/1.jpg", "caption": "another"}),
    ])
    index = shard(ShardConfig(out=str(tmp_path / "o"), captions=(str(caps),), max_bad_fraction=0.9), progress=False)
    assert _bad(index) == {
        "caps.jsonl:2": "line 2 names the same file as line 1",
        "caps.jsonl:3": "line 3 names the same file as line 1",
    }
    assert _sample_ids(tmp_path / "o", index) == ["caps.jsonl/img/0.jpg", "caps.jsonl/img/1.jpg"]


def test_symlink_member_before_a_regular_member_of_the_same_name_spoils_no_neighbour(tmp_path):
    b = TarBuilder()
    for i in range(6):
        key = f"{i:08d}"
        if i == 3:
            b.symlink(f"{key}.jpg", "/etc/passwd")
        b.file(f"{key}.jpg", jpeg(i)).file(f"{key}.txt", f"caption {i}".encode())
    tar = b.write(tmp_path / "w" / "links.tar")
    index = shard(ShardConfig(out=str(tmp_path / "o"), webdataset=(str(tar),), max_bad_fraction=0.5), progress=False)
    assert _bad(index) == {"w/links.tar:00000003.jpg": "not a regular file member (symlink)"}
    assert index.raw["totals"]["sources"] == {"captioned": 6}
    shards = [read_tar(tmp_path / "o" / s.key) for s in index.shards("train")]
    by_id = {json.loads(m["json"])["id"]: m for t in shards for m in t.values()}
    assert by_id["w/links.tar:00000003"]["jpg"] == jpeg(3)


def test_oversize_cls_member_is_listed_not_silently_unlabelled(tmp_path):
    b = TarBuilder()
    for i in range(4):
        b.file(f"{i:08d}.jpg", jpeg(i)).file(f"{i:08d}.cls", b"7")
    b.file("00000004.jpg", jpeg(4)).file("00000004.cls", b"7" * ((1 << 20) + 1))
    tar = b.write(tmp_path / "w" / "cls.tar")
    index = shard(ShardConfig(out=str(tmp_path / "o"), webdataset=(str(tar),), max_bad_fraction=0.5), progress=False)
    assert _bad(index) == {"w/cls.tar:00000004": "cls member too large (1048577 bytes > 1048576)"}
    assert index.raw["totals"]["sources"] == {"labelled": 4}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_of_a_dead_pid_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    imgs = tmp_path / "imgs"
    _images(imgs, 3)
    out = tmp_path / "o"
    store = open_store(str(out))
    here = {"host": socket.gethostname(), **_machine(), "token": "killed-run"}
    store.write_json(LOCK_KEY, {**here, "pid": _dead_pid(), "refreshed_unix": time.time()})
    with caplog.at_level(logging.WARNING, logger="m3i.shard.lock"):
        shard(ShardConfig(out=str(out), unlabelled=(str(imgs),)), progress=False)
    assert "which no longer runs" in caplog.text
    assert not (out / LOCK_KEY).exists()
    # A live holder on this host, or a dead pid on another host, is still refused while fresh.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for lock in ({**here, "pid": live.pid}, {**here, "host": "elsewhere", "pid": _dead_pid()}):
            store.write_json(LOCK_KEY, {**lock, "refreshed_unix": time.time()})
            with pytest.raises(OutputLocked, match="being written by another run"):
                shard(ShardConfig(out=str(out), unlabelled=(str(imgs),)), progress=False)
    finally:
        live.kill()
        live.wait()


def test_empty_class_folder_is_warned_about_and_not_a_class(tmp_path, caplog):
    root = tmp_path / "lab"
    _images(root / "cat", 2)
    _images(root / "dog", 2, start=2)
    (root / "empty").mkdir()
    (root / "only-text").mkdir()
    (root / "only-text" / "notes.txt").write_text("no images here")
    with caplog.at_level(logging.WARNING, logger="m3i.shard.sources"):
        index = shard(ShardConfig(out=str(tmp_path / "o"), labelled=(str(root),)), progress=False)
    assert index.classes == ["cat", "dog"]
    assert "lab/empty holds no images" in caplog.text and "lab/only-text holds no images" in caplog.text


def test_disk_full_while_writing_the_output_names_the_path(tmp_path, monkeypatch):
    imgs = tmp_path / "imgs"
    _images(imgs, 3)
    out = tmp_path / "o"
    atomic_write = LocalStore._atomic_write

    def full_disk(self, path, writer):
        if path.name == LOCK_KEY:
            return atomic_write(self, path, writer)
        # The kernel's own ENOSPC: /dev/full refuses every write, and the error carries no file name.
        with open("/dev/full", "wb", buffering=0) as f:
            writer(f)

    monkeypatch.setattr(LocalStore, "_atomic_write", full_disk)
    with pytest.raises(OSError) as e:
        shard(ShardConfig(out=str(out), unlabelled=(str(imgs),), workers=1), progress=False)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith("[Errno 28] No space left on device: ") and f"{out}/train/" in str(e.value), str(e.value)


def test_disk_full_while_writing_a_part_file_names_the_path(tmp_path, monkeypatch):
    from m3i.shard import writer

    imgs = tmp_path / "imgs"
    _images(imgs, 3)

    def full_open(path, mode="r", *a, **kw):
        return open("/dev/full", mode, *a, **kw) if str(path).endswith(".tar") and "w" in mode else open(path, mode, *a, **kw)

    monkeypatch.setattr(writer, "open", full_open, raising=False)
    with pytest.raises(OSError) as e:
        shard(ShardConfig(out=str(tmp_path / "o"), unlabelled=(str(imgs),), workers=1), progress=False)
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("part-0.tar"), str(e.value)


def test_read_regular_refuses_unread_what_is_not_a_small_regular_file(tmp_path):
    from m3i.shard.files import read_regular

    (tmp_path / "ok.jpg").write_bytes(b"12345")
    (tmp_path / "big.jpg").write_bytes(b"x" * 2048)
    os.mkfifo(tmp_path / "pipe.jpg")
    assert read_regular(str(tmp_path / "ok.jpg"), 1024) == b"12345"
    assert read_regular(str(tmp_path / "ok.jpg"), 5) == b"12345"
    cases = {
        str(tmp_path / "big.jpg"): "too large (2048 bytes > shard.max_input_bytes=1024)",
        str(tmp_path / "pipe.jpg"): "not a regular file (FIFO)",
        "/dev/zero": "not a regular file (character device)",
        str(tmp_path): "not a regular file (directory)",
        str(tmp_path / "none.jpg"): "unreadable: FileNotFoundError: No such file or directory",
        # procfs: a regular file whose size says 0 and whose reads give more; read no further than size + 1.
        "/proc/self/status": "file changed while it was read",
    }
    for path, reason in cases.items():
        with pytest.raises(OSError) as e:
            read_regular(path, 1024)
        assert str(e.value) == reason, path


def test_oversize_pax_header_ends_the_tar_listing_unread(tmp_path):
    import tarfile

    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 2 << 20  # a pax header claiming 2 MiB: tarfile would read it whole
    b = TarBuilder().file("00000000.jpg", jpeg(0)).file("00000000.txt", b"kept")
    b.raw(pax.tobuf(tarfile.USTAR_FORMAT)).raw(b"0" * (2 << 20)).file("00000001.jpg", jpeg(1))
    tar = b.write(tmp_path / "w" / "pax.tar")
    index = shard(ShardConfig(out=str(tmp_path / "o"), webdataset=(str(tar),), max_bad_fraction=0.9), progress=False)
    assert _bad(index) == {"w/pax.tar": "damaged tar (extended header of 2097152 bytes > 1048576) after 2 members"}
    assert index.raw["totals"]["samples"] == 1
