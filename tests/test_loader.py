import hashlib
import json
from pathlib import Path

import pytest
import torch

from m3i.data import EpochPlan, ShardLoader
from m3i.data.plan import derive_seed
from tests.helpers import SMALL, KeyTransform, data_cfg, shard_small, small_demo

N_TRAIN = SMALL.labelled + SMALL.captioned + SMALL.unlabelled


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("loader")
    paths = small_demo(root / "raw")
    # Uneven shards: 10, 10, ..., and a last one of 6 per split.
    shard_small(paths, str(root / "shards"))
    return str(root / "shards")


def _keys(loader, limit=None):
    out = []
    for i, b in enumerate(loader):
        if limit is not None and i >= limit:
            break
        out.append(list(b["key"]))
    return out


def test_one_epoch_reads_each_sample_once(shards):
    loader = ShardLoader(data_cfg(shards, batch_size=4), KeyTransform())
    batches = _keys(loader)
    flat = [k for b in batches for k in b]
    assert len(batches) == len(loader) == N_TRAIN // 4
    assert len(set(flat)) == len(flat) == N_TRAIN
    assert loader.epoch == 1 and loader.stats()["samples_padded"] == 0


def test_sources_select_samples(shards):
    loader = ShardLoader(data_cfg(shards, sources=("captioned",), batch_size=4), KeyTransform())
    srcs = {s for b in loader for s in b["source"]}
    assert srcs == {"captioned"} and len(loader) == SMALL.captioned // 4


def test_order_is_a_function_of_seed_and_epoch(shards):
    a = ShardLoader(data_cfg(shards, seed=1), KeyTransform())
    b = ShardLoader(data_cfg(shards, seed=1), KeyTransform())
    c = ShardLoader(data_cfg(shards, seed=2), KeyTransform())
    ea0, eb0, ec0 = _keys(a), _keys(b), _keys(c)
    assert ea0 == eb0 and ea0 != ec0
    ea1 = _keys(a)
    assert ea1 != ea0  # the next epoch is another order of the same samples
    assert sorted(k for x in ea1 for k in x) == sorted(k for x in ea0 for k in x)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_samples_and_equal_batches(shards, world):
    per_rank = []
    for r in range(world):
        loader = ShardLoader(data_cfg(shards, batch_size=4, num_workers=0), KeyTransform(), rank=r, world_size=world)
        per_rank.append([k for b in _keys(loader) for k in b])
    counts = {len(x) for x in per_rank}
    assert len(counts) == 1 and counts.pop() == (N_TRAIN // world) // 4 * 4
    everything = [k for x in per_rank for k in x]
    assert len(set(everything)) == len(everything)


def test_equal_batches_whatever_the_shard_sizes():
    from m3i.artifacts import ShardInfo

    shards = [ShardInfo(f"s{i}", n, 0, "", {"labelled": n}) for i, n in enumerate([97, 3, 50, 1, 1, 64])]
    for world in (1, 2, 3, 8):
        for workers in (0, 1, 3):
            plan = EpochPlan.build(shards, ("labelled",), seed=0, epoch=5, shuffle=True, batch_size=4, world_size=world, num_workers=workers)
            ranges = [plan.worker_range(r, w) for r in range(world) for w in range(max(1, workers))]
            assert all(x.batches == plan.batches_per_rank // max(1, workers) for x in ranges)
            starts = sorted(x.start for x in ranges)
            # Contiguous, non-overlapping slices inside the epoch.
            assert starts[-1] + ranges[0].batches * 4 <= plan.num_samples


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_restores_the_exact_order(shards, workers):
    cfg = data_cfg(shards, batch_size=4, num_workers=workers, shuffle_buffer=8)
    full = ShardLoader(cfg, KeyTransform(), rank=1, world_size=2)
    reference = [(tuple(b["key"]), b["draw"].tolist()) for b in full]
    first = ShardLoader(cfg, KeyTransform(), rank=1, world_size=2)
    head = []
    for i, b in enumerate(first):
        head.append((tuple(b["key"]), b["draw"].tolist()))
        if i == 4:
            break
    state = first.state_dict()
    assert state["batches_consumed"] == 5
    resumed = ShardLoader(cfg, KeyTransform(), rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    tail = [(tuple(b["key"]), b["draw"].tolist()) for b in resumed]
    assert head + tail == reference  # same samples, same per-sample random draws


def test_resume_refuses_another_world_size(shards):
    a = ShardLoader(data_cfg(shards), KeyTransform())
    b = ShardLoader(data_cfg(shards), KeyTransform(), rank=0, world_size=2)
    with pytest.raises(ValueError, match="loader state world_size=1 differs from this run's 2"):
        b.load_state_dict(a.state_dict())


def _copy_shards(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("verify", [False, True])
def test_truncated_and_corrupt_shards_are_skipped_and_counted(shards, tmp_path, verify):
    root = _copy_shards(shards, tmp_path / "s")
    index = json.loads((root / "index.json").read_text())
    keys = [s["key"] for s in index["splits"]["train"]["shards"]]
    truncated = root / keys[1]
    truncated.write_bytes(truncated.read_bytes()[:3000])  # cut mid-member
    flipped = root / keys[3]
    data = bytearray(flipped.read_bytes())
    data[600:700] = b"\x00" * 100  # corrupt the first image's bytes, tar still parses
    flipped.write_bytes(bytes(data))
    loader = ShardLoader(data_cfg(str(root), batch_size=4, verify_checksums=verify), KeyTransform())
    batches = _keys(loader)
    assert len(batches) == N_TRAIN // 4  # the epoch keeps its length: no rank would hang
    stats = loader.stats()
    if verify:
        assert stats["shards_failed"] == 2  # both fail their checksum before any sample is read
    else:
        assert stats["shards_failed"] >= 1  # the truncated one; the other may only lose an image
    assert stats["samples_padded"] > 0


def test_no_readable_shard_is_a_clear_error(shards, tmp_path):
    root = _copy_shards(shards, tmp_path / "s")
    for p in (root / "train").glob("*.tar"):
        p.write_bytes(b"")
    loader = ShardLoader(data_cfg(str(root)), KeyTransform())
    with pytest.raises(RuntimeError, match="no readable sample"):
        _keys(loader)


def test_too_small_for_a_batch_is_a_value_error(shards):
    with pytest.raises(ValueError, match="data.batch_size=512"):
        ShardLoader(data_cfg(shards, batch_size=512))


def test_default_transform_gives_pixels_normalised_on_the_device(shards):
    from m3i.data import to_device

    loader = ShardLoader(data_cfg(shards, batch_size=8, image_size=24))
    b = next(iter(loader))
    assert tuple(b["image"].shape) == (8, 3, 24, 24) and b["cls"].dtype.is_floating_point is False
    assert b["image"].dtype == torch.uint8  # a quarter of float32's bytes through the workers' shared memory
    x = to_device(b, "cpu")["image"]
    assert x.dtype == torch.float32 and -3 < float(x.mean()) < 3


def test_derive_seed_is_stable():
    assert derive_seed("sample", 0, 1, "k") == derive_seed("sample", 0, 1, "k") != derive_seed("sample", 0, 2, "k")
    assert derive_seed("x") == int.from_bytes(hashlib.sha256(b"x").digest()[:8], "little") & ((1 << 63) - 1)


@pytest.mark.s3
def test_reads_s3_like_local(shards, s3_bucket):
    from m3i.storage import open_store

    store = open_store(s3_bucket + "/ds")
    for p in sorted(Path(shards).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            store.put_file(p.relative_to(shards).as_posix(), str(p))
    local = _keys(ShardLoader(data_cfg(shards, num_workers=2), KeyTransform()))
    remote = _keys(ShardLoader(data_cfg(store.uri, num_workers=2, verify_checksums=True), KeyTransform()))
    assert local == remote


class PidTransform(KeyTransform):
    """KeyTransform plus the id of the process that prepared the sample."""

    def __call__(self, sample, generator):
        import os

        import torch

        return {**super().__call__(sample, generator), "pid": torch.tensor(os.getpid())}


def _pids(loader) -> set[int]:
    return {int(p) for b in loader for p in b["pid"]}


def test_workers_persist_across_epochs_until_closed(shards):
    import os

    loader = ShardLoader(data_cfg(shards, batch_size=4, num_workers=2), PidTransform())
    try:
        first, second = _pids(loader), _pids(loader)
        assert len(first) == 2 and os.getpid() not in first
        assert second == first  # the same two processes served both epochs
        loader.close()
        third = _pids(loader)
        assert len(third) == 2 and third.isdisjoint(first)  # close() stopped them; new ones started
    finally:
        loader.close()


def test_persistent_workers_follow_a_break_and_the_next_epoch(shards):
    cfg = data_cfg(shards, batch_size=4, num_workers=2, shuffle_buffer=8)
    reference = ShardLoader(cfg, KeyTransform())
    want = [_keys(reference), _keys(reference)]
    loader = ShardLoader(cfg, KeyTransform())
    try:
        it = iter(loader)
        head = [list(next(it)["key"]) for _ in range(3)]
        del it  # abandoned mid-epoch: the workers are reset for the next pass, not restarted
        assert loader.state_dict()["batches_consumed"] == 3
        assert head + _keys(loader) == want[0]  # resumes in the same workers at batch 3
        assert _keys(loader) == want[1]
    finally:
        loader.close()


def test_tar_reader_matches_webdataset(shards):
    import webdataset as wds

    from m3i.data.tarstream import iter_samples

    tars = sorted(Path(shards).rglob("*.tar"))
    assert tars
    for tar in tars:
        with open(tar, "rb") as f:
            ours = list(iter_samples(f, str(tar)))
        with open(tar, "rb") as f:
            files = ({**x, "__url__": str(tar)} for x in wds.tariterators.tar_file_iterator(f))
            theirs = list(wds.tariterators.group_by_keys(files))
        assert ours == theirs


def _tar_bytes(members: list[tuple[str, bytes]], fmt) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_reader_long_names_and_grouping(fmt):
    import io
    import tarfile

    from m3i.data.tarstream import iter_samples

    long_dir = "d" * 120  # past the 100-byte name field: ustar prefix, GNU long name, pax path
    members = [
        (f"{long_dir}/a.jpg", b"A" * 700),
        (f"{long_dir}/a.JSON", b"{}"),
        ("__meta__", b"skipped"),
        ("b.seg.txt", b"caption"),
        ("b.cls", b""),
    ]
    fmt_const = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    got = list(iter_samples(io.BytesIO(_tar_bytes(members, fmt_const)), "u"))
    assert got == [
        {"__key__": f"{long_dir}/a", "__url__": "u", "jpg": b"A" * 700, "json": b"{}"},
        {"__key__": "b", "__url__": "u", "seg.txt": b"caption", "cls": b""},
    ]


def test_tar_reader_refuses_damage():
    import io
    import tarfile

    from m3i.data.tarstream import TarFormatError, iter_samples

    data = _tar_bytes([("a.jpg", b"x" * 1000), ("b.jpg", b"y" * 10)], tarfile.USTAR_FORMAT)
    with pytest.raises(TarFormatError, match="truncated tar member"):
        list(iter_samples(io.BytesIO(data[: 512 * 3 + 100]), "u"))
    bad = bytearray(data)
    bad[data.index(b"b.jpg") + 10] ^= 0xFF  # a byte of the second file's header
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_samples(io.BytesIO(bytes(bad)), "u"))
    with pytest.raises(ValueError, match="duplicate"):
        list(iter_samples(io.BytesIO(_tar_bytes([("a.jpg", b"1"), ("a.jpg", b"2")], tarfile.USTAR_FORMAT)), "u"))


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")])
def test_decode_image_gives_what_pil_gives(mode, fmt):
    import io

    import numpy as np
    from PIL import Image

    from m3i.data import decode_image

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((37, 53, 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    data = buf.getvalue()
    got = decode_image(data)
    want = Image.open(io.BytesIO(data)).convert("RGB")
    assert got.mode == "RGB" and got.size == (53, 37)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises((OSError, ValueError)):
        decode_image(data[: len(data) // 2])
