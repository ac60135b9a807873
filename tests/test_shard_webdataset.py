"""`m3i shard --webdataset`: existing WebDataset tars (img2dataset / ImageNet-wds layouts) as inputs."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from m3i.config import ShardConfig
from m3i.shard import read_index, shard
from m3i.storage import open_store
from tests.helpers import read_tar


def _jpeg(seed: int, size: int = 24) -> bytes:
    img = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (seed % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def img2dataset_tars(root: Path) -> dict:
    """Two tars in img2dataset's layout plus one ImageNet-style tar of `cls` samples.

    00000.tar: 6 good image-text samples, one whose jpg is garbage, one with no image at all.
    00001.tar: 4 good samples, captions only in the json (DataComp-style), one a PNG.
    labelled-000.tar: 5 samples with `cls` (class "3" or "7").
    """
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, bytes] = {}
    m0 = []
    for i in range(6):
        key = f"0000{i:04d}"
        good[key] = _jpeg(i)
        m0 += [(f"{key}.jpg", good[key]), (f"{key}.txt", f"caption number {i}".encode()),
               (f"{key}.json", json.dumps({"url": f"http://x/{i}", "key": key, "status": "success"}).encode())]
    m0 += [("00000006.jpg", b"this is not a JPEG at all"), ("00000006.txt", b"broken image")]
    m0 += [("00000007.txt", b"a caption with no image"), ("00000007.json", b"{}")]
    _write_tar(root / "00000.tar", m0)
    m1 = []
    for i in range(4):
        key = f"0001{i:04d}"
        data = _png(i) if i == 0 else _jpeg(10 + i)
        good[key] = data
        m1 += [(f"{key}.{'png' if i == 0 else 'jpg'}", data), (f"{key}.json", json.dumps({"caption": f"json caption {i}"}).encode())]
    _write_tar(root / "00001.tar", m1)
    m2 = []
    for i in range(5):
        key = f"n0{i:03d}"
        good[key] = _jpeg(20 + i)
        m2 += [(f"{key}.jpeg", good[key]), (f"{key}.cls", b"3" if i % 2 else b"7")]
    _write_tar(root / "labelled-000.tar", m2)
    return good


def _by_id(out: Path, index) -> dict[str, dict[str, bytes]]:
    samples = {}
    for split in index.splits:
        for s in index.shards(split):
            for members in read_tar(out / s.key).values():
                samples[json.loads(members["json"])["id"]] = members
    return samples


def test_img2dataset_tars_are_sharded_with_counts_and_skip_reasons(tmp_path):
    good = img2dataset_tars(tmp_path / "wds")
    out = tmp_path / "out"
    cfg = ShardConfig(
        out=str(out), webdataset=(str(tmp_path / "wds" / "{00000..00001}.tar"), str(tmp_path / "wds" / "labelled-000.tar")),
        max_samples_per_shard=4, max_bad_fraction=0.2, workers=2,
    )
    index = shard(cfg, progress=False)
    totals = index.raw["totals"]["sources"]
    assert totals == {"captioned": 10, "labelled": 5}
    assert index.classes == ["3", "7"]
    reasons = {b["id"]: b["reason"] for b in index.raw["bad"]["items"]}
    assert reasons == {
        "wds/00000.tar:00000006": "undecodable image: not an image (PIL cannot identify it)",
        "wds/00000.tar:00000007": "no image member (has json, txt)",
    }
    samples = _by_id(out, index)
    assert len(samples) == 15
    # Captions from txt (img2dataset) and from json (DataComp-style); valid JPEG bytes copied as they are.
    assert samples["wds/00000.tar:00000002"]["txt"] == b"caption number 2"
    assert samples["wds/00000.tar:00000002"]["jpg"] == good["00000002"]
    assert samples["wds/00001.tar:00010003"]["txt"] == b"json caption 3"
    assert samples["wds/00001.tar:00010000"]["jpg"] != good["00010000"]  # the PNG was encoded to JPEG
    # cls members become labels named by their text.
    lab = samples["wds/labelled-000.tar:n0001"]
    assert index.classes[int(lab["cls"])] == "3" and "txt" not in lab
    assert lab["jpg"] == good["n0001"]
    # Shards hold at most max_samples_per_shard samples, checksums verify.
    store = open_store(str(out))
    for s in index.shards("train"):
        assert s.samples <= 4 and store.sha256(s.key) == s.sha256


def test_webdataset_rerun_resumes_per_tar_and_reuses_listings(tmp_path):
    img2dataset_tars(tmp_path / "wds")
    cfg = ShardConfig(out=str(tmp_path / "out"), webdataset=(str(tmp_path / "wds" / "*.tar").replace("*", "{00000,00001,labelled-000}"),),
                      max_bad_fraction=0.2, workers=1)
    first = shard(cfg, progress=False)
    assert first.raw["run"]["units_written"] == 3
    assert len(list((tmp_path / "out" / "_progress" / "tars").glob("*.json"))) == 3
    again = shard(cfg, progress=False)
    assert again.raw["run"] == {**again.raw["run"], "units_written": 0, "units_reused": 3}
    # A rewritten tar is listed and sharded again; the others are reused.
    _write_tar(tmp_path / "wds" / "00001.tar", [("k.jpg", _jpeg(99)), ("k.txt", b"new")])
    third = shard(cfg, progress=False)
    assert third.raw["run"]["units_written"] == 1 and third.raw["run"]["units_reused"] == 2
    assert third.raw["totals"]["sources"] == {"captioned": 7, "labelled": 5}


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    img2dataset_tars(tmp_path / "wds")
    src = tmp_path / "wds" / "labelled-000.tar"
    with tarfile.open(src) as tar:
        third_image = [m for m in tar.getmembers() if m.name.endswith(".jpeg")][2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: third_image.offset_data + 100])  # inside the 3rd image's bytes
    index = shard(ShardConfig(out=str(tmp_path / "out"), webdataset=(str(cut),), max_bad_fraction=0.9), progress=False)
    assert index.raw["totals"]["sources"] == {"labelled": 2}
    reasons = sorted(b["reason"] for b in index.raw["bad"]["items"])
    assert any(r.startswith("truncated tar after") for r in reasons), reasons
    assert "undecodable image: truncated image" in reasons or any("truncated image" in r for r in reasons), reasons


def test_missing_tar_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"shard.webdataset='.*nope-1.tar' is not a file"):
        shard(ShardConfig(out=str(tmp_path / "o"), webdataset=(str(tmp_path / "nope-{1..2}.tar"),)), progress=False)


@pytest.mark.s3
def test_webdataset_tars_in_s3_through_the_cli(tmp_path, s3_bucket, s3_env):
    img2dataset_tars(tmp_path / "wds")
    inputs = open_store(f"{s3_bucket}/laion")
    for p in sorted((tmp_path / "wds").glob("*.tar")):
        inputs.put_file(p.name, str(p))
    out = f"{s3_bucket}/shards"
    proc = subprocess.run(
        [sys.executable, "-m", "m3i", "-q", "shard", "--out", out, "--webdataset", f"{s3_bucket}/laion/{{00000..00001}}.tar",
         "--webdataset", f"{s3_bucket}/laion/labelled-000.tar", "--set", "shard.max_bad_fraction=0.2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    index = read_index(open_store(out))
    assert index.raw["totals"]["sources"] == {"captioned": 10, "labelled": 5}
    assert index.raw["bad"]["count"] == 2
    assert s3_env not in json.dumps(index.raw)  # no endpoint address in the index


@pytest.mark.s3
def test_pipeline_steps_plan_and_shard_webdataset_inputs_in_place(tmp_path, s3_bucket):
    from m3i.pipeline.steps import list_sources, plan_dataset, shard_dataset, stage_sources

    img2dataset_tars(tmp_path / "wds")
    inputs = open_store(f"{s3_bucket}/laion")
    for p in sorted((tmp_path / "wds").glob("*.tar")):
        inputs.put_file(p.name, str(p))
    sources = {"webdataset": [f"{s3_bucket}/laion/{{00000..00001}}.tar"]}
    rows = list_sources(sources)
    assert [r.split("\t")[2] for r in rows] == ["00000.tar", "00001.tar"]
    assert stage_sources(sources, tmp_path / "scratch")["webdataset"] == sources["webdataset"]  # read where they are
    assert not (tmp_path / "scratch").exists()
    plan = plan_dataset(sources, f"{s3_bucket}/store", overrides=["shard.max_bad_fraction=0.2"])
    m = shard_dataset(sources, plan["dataset_uri"], overrides=["shard.max_bad_fraction=0.2"])
    assert m["sources"] == {"captioned": 10} and m["bad_inputs"] == 2
