"""The demo data generator: determinism, layout, captions, validation, a disjoint eval split."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from m3i.demo import CLASSES, DemoCounts, draw_scene, make_demo_data

# The vocabulary captions promise; spelled out here so the test is the spec, not a mirror.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
SMALL = DemoCounts(labelled=16, captioned=8, unlabelled=4, eval=8, size=32)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _image_hashes(root: Path, kinds: tuple[str, ...]) -> set[str]:
    """Hashes of decoded pixels, so PNG and JPEG encodings of one picture compare equal."""
    out = set()
    for kind in kinds:
        for p in (root / kind).rglob("*"):
            if p.suffix in (".png", ".jpg"):
                out.add(hashlib.sha256(Image.open(p).convert("RGB").tobytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("demo")
    return root, make_demo_data(root, SMALL, seed=0)


def test_deterministic_and_seed_dependent(demo, tmp_path):
    root, _ = demo
    again = tmp_path / "again"
    make_demo_data(again, SMALL, seed=0)
    assert _hashes(again) == _hashes(root)

    other = tmp_path / "other"
    make_demo_data(other, SMALL, seed=1)
    a, b = _hashes(root), _hashes(other)
    images = [k for k in a if k.endswith((".png", ".jpg"))]
    assert images and all(a[k] != b[k] for k in images)


def test_rerun_into_same_root_is_idempotent_and_prunes(tmp_path):
    make_demo_data(tmp_path, SMALL, seed=0)
    before = _hashes(tmp_path)
    make_demo_data(tmp_path, SMALL, seed=0)
    assert _hashes(tmp_path) == before

    fewer = DemoCounts(labelled=8, captioned=2, unlabelled=1, eval=0, size=32)
    make_demo_data(tmp_path, fewer, seed=0)
    assert len(list((tmp_path / "labelled").rglob("*.png"))) == 8
    assert len(list((tmp_path / "captioned").glob("*.jpg"))) == 2
    assert len(list((tmp_path / "unlabelled").glob("*.jpg"))) == 1
    assert not list((tmp_path / "eval").rglob("*.png"))
    # Files that survive are the same bytes: an image depends on (seed, kind, index) only.
    after = _hashes(tmp_path)
    assert after["labelled/circle/000000.png"] == before["labelled/circle/000000.png"]


def test_refuses_a_root_with_foreign_data(tmp_path):
    (tmp_path / "labelled").mkdir()
    with pytest.raises(ValueError, match="not written by m3i demo-data"):
        make_demo_data(tmp_path, SMALL)


def test_layout_counts_and_balance(demo):
    root, paths = demo
    assert set(paths) == {"labelled", "captions", "unlabelled", "eval", "attributes", "manifest"}
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths.values())

    for kind, count in (("labelled", SMALL.labelled), ("eval", SMALL.eval)):
        per_class = {c: len(list((root / kind / c).glob("*.png"))) for c in CLASSES}
        assert sum(per_class.values()) == count
        assert max(per_class.values()) - min(per_class.values()) <= 1
        assert sorted(p.name for p in (root / kind).iterdir()) == sorted(CLASSES)
    assert len(list((root / "unlabelled").glob("*.jpg"))) == SMALL.unlabelled
    assert len(list((root / "captioned").glob("*.jpg"))) == SMALL.captioned

    with Image.open(next((root / "labelled" / "ring").glob("*.png"))) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (SMALL.size, SMALL.size))
    with Image.open(next((root / "unlabelled").glob("*.jpg"))) as im:
        assert im.format == "JPEG"

    manifest = json.loads(Path(paths["manifest"]).read_text())
    assert manifest["seed"] == 0 and manifest["complete"] is True
    assert manifest["classes"] == list(CLASSES)
    assert DemoCounts(**manifest["counts"]) == SMALL
    assert {k: str(root / v) for k, v in manifest["paths"].items()} == {
        k: v for k, v in paths.items() if k != "manifest"
    }


def test_captions_jsonl(demo):
    root, paths = demo
    lines = Path(paths["captions"]).read_text().splitlines()
    assert len(lines) == SMALL.captioned
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"image", "caption"}
        assert (Path(paths["captions"]).parent / row["image"]).is_file()
        caption = row["caption"]
        assert any(re.search(rf"\b{c}\b", caption) for c in COLOURS), caption
        assert any(p in caption for p in POSITIONS), caption
        assert re.search(r"\b(small|large)\b", caption), caption


def test_attributes_jsonl_describes_every_image(demo):
    root, paths = demo
    rows = [json.loads(line) for line in Path(paths["attributes"]).read_text().splitlines()]
    assert len(rows) == SMALL.labelled + SMALL.captioned + SMALL.unlabelled + SMALL.eval
    images = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".png", ".jpg")}
    assert {r["image"] for r in rows} == images
    captions = {json.loads(line)["image"]: json.loads(line)["caption"] for line in Path(paths["captions"]).read_text().splitlines()}
    for r in rows:
        assert set(r) == {"image", "source", "shape", "colour", "size", "position"}
        assert r["shape"] in CLASSES and r["colour"] in COLOURS and r["size"] in ("small", "large")
        if r["source"] in ("labelled", "eval"):
            assert r["image"].split("/")[1] == r["shape"]  # the class folder is the shape
        if r["source"] == "captioned":  # the caption states this row's colour, size and position
            c = captions[r["image"]]
            assert r["colour"] in c and r["size"] in c and r["position"] in c, (r, c)


def test_draw_scene_caption_never_names_its_shape():
    forms = set()
    seen = set()
    for i in range(200):
        image, label, caption = draw_scene(random.Random(f"scene/{i}"), 48)
        assert 0 <= label < len(CLASSES)
        assert image.mode == "RGB" and image.size == (48, 48)
        # labels and captions carry different facts: the shape is the label's alone
        assert not [c for c in CLASSES if re.search(rf"\b{c}\b", caption)], caption
        seen.add(label)
        forms.add(caption.split()[0])
    assert seen == set(range(len(CLASSES)))
    assert len(forms) > 1  # several templates, not one sentence form
    a = draw_scene(random.Random("same"))
    b = draw_scene(random.Random("same"))
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]


def test_eval_images_never_equal_training_images(demo):
    root, _ = demo
    train = _image_hashes(root, ("labelled", "captioned", "unlabelled"))
    held_out = _image_hashes(root, ("eval",))
    assert len(held_out) == SMALL.eval
    assert not train & held_out


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"labelled": -1}, ("labelled", "-1")),
        ({"captioned": -3}, ("captioned", "-3")),
        ({"eval": 3}, ("eval", "3", "6")),
        ({"size": 8}, ("size", "8", "16", "512")),
        ({"size": 1024}, ("size", "1024")),
        ({"unlabelled": 1.5}, ("unlabelled", "1.5")),
    ],
)
def test_counts_validation(kwargs, words):
    with pytest.raises(ValueError) as err:
        DemoCounts(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_zero_counts_are_allowed(tmp_path):
    paths = make_demo_data(tmp_path, DemoCounts(labelled=0, captioned=0, unlabelled=0, eval=0, size=16))
    assert Path(paths["captions"]).read_text() == ""
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.jpg"))
