import hashlib
import json
from pathlib import Path

import pytest

from m3i.config import ShardConfig
from m3i.shard import INDEX_KEY, ShardError, read_index, shard
from m3i.storage import open_store
from tests.helpers import SMALL, read_tar, shard_cfg, shard_small, small_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo"))


def _all_samples(out: Path, index) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for split in index.splits:
        for s in index.shards(split):
            for key, members in read_tar(out / s.key).items():
                assert key not in samples, f"{key} is in two shards"
                samples[key] = members
    return samples


def test_round_trip_every_good_sample_in_exactly_one_shard(demo, tmp_path):
    out = tmp_path / "shards"
    index = shard_small(demo, str(out))
    samples = _all_samples(out, index)
    assert len(samples) == SMALL.labelled + SMALL.captioned + SMALL.unlabelled + SMALL.eval
    by_id = {json.loads(m["json"])["id"]: m for m in samples.values()}
    # Labelled (PNG, re-encoded): the class index matches the folder name.
    for p in Path(demo["labelled"]).rglob("*.png"):
        m = by_id[f"labelled/{p.parent.name}/{p.name}"]
        assert index.classes[int(m["cls"])] == p.parent.name
        assert "txt" not in m
    # Captioned (JPEG, copied byte for byte): the caption and the exact bytes come back.
    lines = [json.loads(x) for x in Path(demo["captions"]).read_text().splitlines()]
    for row in lines:
        m = by_id[f"captions.jsonl/{row['image']}"]
        assert m["txt"].decode() == row["caption"]
        assert m["jpg"] == (Path(demo["captions"]).parent / row["image"]).read_bytes()
        assert "cls" not in m
    # Unlabelled: no label, no caption, same bytes.
    for p in Path(demo["unlabelled"]).glob("*.jpg"):
        m = by_id[f"unlabelled/{p.name}"]
        assert m["jpg"] == p.read_bytes() and "cls" not in m and "txt" not in m
    # The eval split holds exactly the held-out folder.
    eval_ids = {json.loads(m["json"])["id"] for k, m in samples.items() if k in _keys(out, index, "eval")}
    assert eval_ids == {f"eval/{p.parent.name}/{p.name}" for p in Path(demo["eval"]).rglob("*.png")}


def _keys(out, index, split):
    return {k for s in index.shards(split) for k in read_tar(out / s.key)}


def test_index_counts_checksums_and_config(demo, tmp_path):
    out = tmp_path / "shards"
    index = shard_small(demo, str(out))
    raw = json.loads((out / INDEX_KEY).read_text())
    assert raw["format"] == "m3i-shards" and raw["format_version"] == 1
    assert raw["classes"] == sorted(p.name for p in Path(demo["labelled"]).iterdir())
    assert raw["totals"]["sources"] == {"labelled": SMALL.labelled + SMALL.eval, "captioned": SMALL.captioned, "unlabelled": SMALL.unlabelled}
    assert raw["config"]["max_samples_per_shard"] == 10
    for split in ("train", "eval"):
        for s in index.shards(split):
            data = (out / s.key).read_bytes()
            assert s.bytes == len(data) and s.sha256 == hashlib.sha256(data).hexdigest()
            assert s.samples == len(read_tar(out / s.key)) == sum(s.sources.values()) <= 10
    assert index.num_samples("train") == SMALL.labelled + SMALL.captioned + SMALL.unlabelled


def test_rerun_is_idempotent_and_interrupted_run_resumes(demo, tmp_path):
    out = tmp_path / "shards"
    first = shard_small(demo, str(out))
    again = shard_small(demo, str(out))
    assert again.raw["run"]["units_written"] == 0
    assert again.splits == first.splits
    # An interrupted run: the index was never written and two units never finished.
    (out / INDEX_KEY).unlink()
    progress = sorted((out / "_progress").glob("train-*.json"))
    for rec in progress[:2]:
        for s in json.loads(rec.read_text())["shards"]:
            (out / s["key"]).unlink()
        rec.unlink()
    # And one finished shard was damaged since: its checksum no longer matches.
    victim = first.shards("eval")[0]
    (out / victim.key).write_bytes(b"garbage")
    resumed = shard_small(demo, str(out))
    assert resumed.raw["run"]["units_written"] == 3
    assert resumed.raw["run"]["units_reused"] == len(progress) + len(first.shards("eval")) - 3
    assert resumed.splits == first.splits


def test_bad_inputs_are_skipped_counted_listed(demo, tmp_path):
    raw = tmp_path / "raw"
    lab = raw / "labelled"
    for p in Path(demo["labelled"]).rglob("*.png"):
        dst = lab / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    good = sorted(lab.rglob("*.png"))
    truncated = good[0].read_bytes()
    good[0].write_bytes(truncated[: len(truncated) // 3])  # a truncated PNG
    (lab / "circle" / "not-an-image.jpg").write_bytes(b"this is text, not a JPEG")
    caps = raw / "caps.jsonl"
    src = Path(demo["captions"]).parent / json.loads(Path(demo["captions"]).read_text().splitlines()[0])["image"]
    img = raw / "images" / src.name
    img.parent.mkdir()
    img.write_bytes(src.read_bytes())
    caps.write_text(
        "\n".join(
            [
                json.dumps({"image": f"images/{src.name}", "caption": "a fine caption"}),
                json.dumps({"image": "missing/file.jpg", "caption": "no such image"}),
                "{this is not json",
                json.dumps({"image": f"images/{src.name}"}),
            ]
        )
        + "\n"
    )
    cfg = ShardConfig(out=str(tmp_path / "out"), labelled=(str(lab),), captions=(str(caps),), max_samples_per_shard=16, max_bad_fraction=0.2)
    index = shard(cfg, progress=False)
    bad = index.raw["bad"]
    assert bad["count"] == 5
    reasons = " | ".join(b["reason"] for b in bad["items"])
    assert reasons.count("undecodable image") == 2 and "missing file missing/file.jpg" in reasons
    assert "line 3 is not JSON" in reasons and "line 4 has no 'caption'" in reasons
    assert index.num_samples("train") == len(good) - 1 + 1  # every good sample, once
    # Over the limit: a clear error and no index.
    strict = ShardConfig(**{**cfg.__dict__, "out": str(tmp_path / "strict"), "max_bad_fraction": 0.01})
    with pytest.raises(ShardError, match=r"5 of 53 inputs are bad .* shard.max_bad_fraction=0.01"):
        shard(strict, progress=False)
    assert not (tmp_path / "strict" / INDEX_KEY).exists()


def test_skip_reasons_name_the_cause_and_are_the_same_every_run(demo, tmp_path):
    import io

    from PIL import Image

    lab = tmp_path / "labelled"
    for p in sorted(Path(demo["labelled"]).rglob("*.png"))[:12]:
        dst = lab / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    cls = sorted(d for d in lab.iterdir())[0]
    (cls / "garbage.jpg").write_bytes(b"this is text, not a JPEG")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    (cls / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    runs = []
    for out in ("a", "b"):
        cfg = ShardConfig(out=str(tmp_path / out), labelled=(str(lab),), max_samples_per_shard=8, max_bad_fraction=0.5, workers=2)
        runs.append(json.dumps(shard(cfg, progress=False).raw["bad"], sort_keys=True).encode())
    assert runs[0] == runs[1]
    reasons = {b["id"].rsplit("/", 1)[-1]: b["reason"] for b in json.loads(runs[0])["items"]}
    assert reasons == {
        "garbage.jpg": "undecodable image: not an image (PIL cannot identify it)",
        "truncated.jpg": "undecodable image: truncated image",
    }


def test_decode_reasons_are_short_and_carry_no_addresses(monkeypatch, tmp_path):
    import io

    from PIL import Image, UnidentifiedImageError

    from m3i.shard.encode import EncodeOptions, decode_reason, encode_sample
    from m3i.shard.inputs import InputItem

    assert decode_reason(UnidentifiedImageError("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0d90>")) == (
        "not an image (PIL cannot identify it)"
    )
    assert decode_reason(OSError("Truncated File Read")) == decode_reason(OSError("image file is truncated (3 bytes not processed)"))
    assert decode_reason(OSError("broken data stream when reading <_io.BufferedReader name=3> at 0x7f00ab")) == (
        "corrupt image (broken data stream when reading)"
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # PIL warns between the limit and twice it, and raises above
        path = tmp_path / f"big-{side}.png"
        Image.new("RGB", (side, side)).save(path)
        item = InputItem(source="labelled", id=path.name, path=str(path), split="train")
        with pytest.raises(OSError, match=rf"^undecodable image: too large \({side * side} pixels > limit 1000\)$"):
            encode_sample(item, {}, EncodeOptions(None, True, 90))


def test_byte_cap_splits_shards(demo, tmp_path):
    out = tmp_path / "shards"
    cap = 3 * 10240  # a multiple of tar's 10 KiB record, which pads every file
    index = shard_small(demo, str(out), max_samples_per_shard=40, max_bytes_per_shard=cap)
    shards = index.shards("train")
    assert len(shards) > 3
    assert all(s.bytes <= cap for s in shards)
    assert any(s.samples > 1 for s in shards)
    assert index.num_samples("train") == SMALL.labelled + SMALL.captioned + SMALL.unlabelled


def test_one_worker_in_process_writes_the_same_shards_as_a_pool(demo, tmp_path):
    # workers=1 writes the units in the calling process; a pool of workers must give the same bytes.
    inline = shard_small(demo, str(tmp_path / "w1"), workers=1, max_bytes_per_shard=3 * 10240)
    pool = shard_small(demo, str(tmp_path / "w2"), workers=2, max_bytes_per_shard=3 * 10240)
    assert inline.splits == pool.splits
    keys = [s.key for split in inline.splits for s in inline.shards(split)]
    assert len(keys) > 4
    for key in keys:
        assert (tmp_path / "w1" / key).read_bytes() == (tmp_path / "w2" / key).read_bytes()


def test_sample_tar_writer_writes_what_webdataset_writes():
    import io
    import random

    import webdataset as wds

    from m3i.shard.encode import SampleTarWriter

    rng = random.Random(0)
    samples = []
    # Keys of every kind the fast header path must hand to tarfile: long (pax), non-ASCII (pax), with a slash.
    for i, key in enumerate(["labelled_" + "ab" * 10, "k" * 98, "k" * 99, "k" * 140, "ünï_key", "a/b", "x"] * 3):
        size = rng.choice([0, 1, 511, 512, 513, 3000])
        sample = {"__key__": f"{key}{i}", "jpg": rng.randbytes(size), "json": b'{"a": 1}', "txt": "café".encode()}
        if i % 2:
            sample["cls"] = b"3"
        samples.append(sample)
    for n in (0, 1, len(samples)):
        theirs = io.BytesIO()
        writer = wds.TarWriter(theirs, mtime=0, encoder=False)
        for sample in samples[:n]:
            writer.write(sample)
        writer.close()
        ours = io.BytesIO()
        w = SampleTarWriter(ours)
        for sample in samples[:n]:
            w.write(sample)
        sha = w.close()
        assert ours.getvalue() == theirs.getvalue()
        assert (w.size, sha) == (len(theirs.getvalue()), hashlib.sha256(theirs.getvalue()).hexdigest())


def test_sample_metadata_is_the_json_dumps_of_it():
    from m3i.shard.encode import _meta_json

    for source, id_, label in [("labelled", 'a"b\\c/ü\x01\udcff€😀.png', 'cl"ass é'), ("captioned", "x.jpg", None), ("unlabelled", "", "")]:
        meta = {"source": source, "id": id_, "width": 31, "height": 123456}
        if label is not None:
            meta["class_name"] = label
        assert _meta_json(source, id_, 31, 123456, label) == json.dumps(meta, sort_keys=True).encode()


def test_eval_fraction_holds_out_each_class(demo, tmp_path):
    cfg = shard_cfg(demo, str(tmp_path / "s"), eval_labelled=(), captions=(), unlabelled=(), eval_fraction=0.5)
    index = shard(cfg, progress=False)
    assert index.num_samples("eval") == SMALL.labelled // 2  # 3 of each class of 6
    assert index.num_samples("train") == SMALL.labelled // 2


def test_csv_captions_and_resize(tmp_path, demo):
    rows = [json.loads(x) for x in Path(demo["captions"]).read_text().splitlines()][:5]
    csv = tmp_path / "caps.csv"
    base = Path(demo["captions"]).parent
    csv.write_text("image,caption\n" + "".join(f"{base / r['image']},\"{r['caption']}, with a comma\"\n" for r in rows))
    index = shard(ShardConfig(out=str(tmp_path / "o"), captions=(str(csv),), resize=16, workers=1, allow_outside_paths=True), progress=False)
    samples = read_tar(tmp_path / "o" / index.shards("train")[0].key)
    assert len(samples) == 5
    assert all(json.loads(m["json"])["width"] == 16 for m in samples.values())
    assert {m["txt"].decode() for m in samples.values()} == {r["caption"] + ", with a comma" for r in rows}


def test_bad_layout_is_a_clear_value_error(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="shard.labelled=.* has no class sub-folders"):
        shard(ShardConfig(out=str(tmp_path / "o"), labelled=(str(tmp_path / "flat"),)), progress=False)
    with pytest.raises(ValueError, match="shard.unlabelled='/nope' is not a folder"):
        shard(ShardConfig(out=str(tmp_path / "o"), unlabelled=("/nope",)), progress=False)
    with pytest.raises(ValueError, match="no inputs"):
        shard(ShardConfig(out=str(tmp_path / "o")), progress=False)


@pytest.mark.s3
def test_shard_to_s3(demo, s3_bucket):
    uri = s3_bucket + "/datasets/demo"
    index = shard_small(demo, uri)
    store = open_store(uri)
    assert read_index(store).splits == index.splits
    s = index.shards("train")[0]
    assert store.stat(s.key).metadata["sha256"] == s.sha256 == hashlib.sha256(store.get_bytes(s.key)).hexdigest()
    again = shard_small(demo, uri)
    assert again.raw["run"]["units_written"] == 0  # checksums verified through object metadata
