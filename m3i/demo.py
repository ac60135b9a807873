"""An offline, deterministic demo data set for ``m3i demo-data``: shapes on noisy backgrounds.

    paths = make_demo_data("m3i-data/raw", DemoCounts(), seed=0)

Every scene is one shape in one colour, size and position on a mildly textured
background. The sources carry *different* facts, so the value of learning from each is
measurable: labels say the shape and nothing else; captions say the colour, size and
position and never the shape; unlabelled images carry only the pixels. Every attribute is
drawn independently of the others, so none can be read off another. Shapes are sized to a
ViT's patch grid: at the default 32 px a small shape spans about two 8-px patches, a large
one about two and a half. Layout under ``root``::

    labelled/<class>/<id>.png     the labelled source (class sub-folders)
    captioned/<id>.jpg            images of the image-text source
    captions.jsonl                {"image": "captioned/<id>.jpg", "caption": "..."} per line
    unlabelled/<id>.jpg           the unlabelled source
    eval/<class>/<id>.png         the held-out labelled split
    attributes.jsonl              {"image", "source", "shape", "colour", "size", "position"} of every image
    demo.json                     manifest: generator, seed, counts, classes, attributes, paths

Each image is drawn from ``random.Random(f"{seed}/{kind}/{index}")`` alone, so the
bytes depend only on (seed, kind, index) and never on call order or other counts.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from m3i.config.core import check_range

__all__ = ["ATTRIBUTES", "CLASSES", "COLOURS", "POSITIONS", "SIZES", "DemoCounts", "draw_scene", "make_demo_data"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "bar")
"""Shape names; a label is an index into this tuple (also the class folder names). Six shapes
that stay distinct at 32 px (a star or a diamond at that size reads as a blob or a square)."""

# Bumped whenever the drawing changes, so a manifest tells which pictures it describes.
_GENERATOR = "m3i.demo/2"
_JPEG_QUALITY = 92
# Shapes are rasterised this many times larger and box-filtered down: cheap anti-aliasing,
# so small stars and triangles keep their corners at 64x64.
_SUPERSAMPLE = 4

_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 40, 40)),
    ("green", (40, 165, 60)),
    ("blue", (40, 85, 220)),
    ("yellow", (235, 205, 40)),
    ("purple", (140, 60, 190)),
    ("orange", (245, 130, 30)),
)
# (caption phrase, centre x, centre y) as fractions of the side.
_POSITIONS: tuple[tuple[str, float, float], ...] = (
    ("top left corner", 0.25, 0.25),
    ("top right corner", 0.75, 0.25),
    ("bottom left corner", 0.25, 0.75),
    ("bottom right corner", 0.75, 0.75),
    ("centre", 0.5, 0.5),
)
# Outer radius as a fraction of the side; the gap between the ranges keeps "small" and
# "large" separable rather than a judgement call at the boundary.
_RADII = {"small": (0.2, 0.24), "large": (0.3, 0.34)}
# Shapes stand upright (bars lie or stand): at 32 px a tilt mostly adds aliasing, and a
# from-scratch ViT needed twice the steps to generalise across it (measured, 2026-11-30).
_TILT = {"circle": 0, "square": 0, "triangle": 0, "cross": 0, "ring": 0, "bar": 0}
# No template names the shape: that is the label's fact, not the caption's.
_TEMPLATES = (
    "a {size} {colour} shape in the {where}",
    "there is something {size} and {colour} in the {where}",
    "a picture of a {size} {colour} object in the {where}",
    "a {size} thing in {colour}, in the {where}",
    "in the {where}: something {size} and {colour}",
)

COLOURS: tuple[str, ...] = tuple(name for name, _ in _COLOURS)
"""Colour names the captions use."""
SIZES: tuple[str, ...] = tuple(_RADII)
"""Size words the captions use."""
POSITIONS: tuple[str, ...] = tuple(where for where, _, _ in _POSITIONS)
"""Position phrases the captions use."""
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": CLASSES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
"""Every attribute of a scene and its values; ``shape`` is the label, the others are in captions."""


# Outlines in unit coordinates (y down, outer radius about 1).
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)],
    # Equilateral, centroid at the origin, pointing up.
    "triangle": [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)],
    "cross": [
        (-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
        (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3),
    ],
    "bar": [(-1.0, -0.26), (1.0, -0.26), (1.0, 0.26), (-1.0, 0.26)],
}


@dataclass(frozen=True)
class DemoCounts:
    """How many images ``make_demo_data`` writes per source, and their size."""

    labelled: int = 1800
    """Images of the labelled source, spread round-robin over ``CLASSES`` (0, or at least one per class)."""

    captioned: int = 1200
    """Image-caption pairs of the image-text source."""

    unlabelled: int = 600
    """Images of the unlabelled source."""

    eval: int = 360
    """Images of the held-out labelled split, balanced like ``labelled`` (0, or at least one per class)."""

    size: int = 32
    """Side of the square images in pixels (the ``demo`` preset trains at 32)."""

    def __post_init__(self) -> None:
        s = "demo"
        for name in ("labelled", "captioned", "unlabelled", "eval", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{s}.{name}={value!r} is not an integer")
        for name in ("labelled", "captioned", "unlabelled", "eval"):
            check_range(s, name, getattr(self, name), 0)
        for name in ("labelled", "eval"):
            value = getattr(self, name)
            # A split missing a class would make per-class accuracy undefined downstream.
            if 0 < value < len(CLASSES):
                raise ValueError(
                    f"{s}.{name}={value} is too few; allowed 0 or at least {len(CLASSES)} (one per class)"
                )
        check_range(s, "size", self.size, 16, 512)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _POLYGONS[shape]]


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Coverage of the shape per pixel, float32 in [0, 1], shape ``[size, size]``."""
    k = _SUPERSAMPLE
    big = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = cx * k, cy * k, r * k
    if shape == "circle":
        draw.ellipse((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: random.Random, size: int) -> np.ndarray:
    """A mild, random texture, float32 ``[size, size, 3]`` in about [40, 215]."""
    grey = rng.uniform(70, 185)
    tint = np.array([rng.uniform(-12, 12) for _ in range(3)], dtype=np.float32)
    # Low-frequency blotches: a coarse grid of random levels, upsampled smoothly.
    n = rng.randint(3, 6)
    coarse = np.array([rng.uniform(-1, 1) for _ in range(n * n)], dtype=np.float32).reshape(n, n)
    blotch = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    # Faint stripes at a random angle, so texture is not only blobs.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, math.pi)
    freq = rng.uniform(2, 8)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 6.3))
    lum = grey + rng.uniform(5, 22) * blotch + rng.uniform(0, 7) * stripes
    return lum[..., None] + tint


def _scene(rng: random.Random, size: int, label: int) -> tuple[Image.Image, str, dict[str, str]]:
    """Draw one scene of class ``label``: the image, a caption (colour, size, position) and every attribute."""
    shape = CLASSES[label]
    colour, rgb = rng.choice(_COLOURS)
    size_word = rng.choice(("small", "large"))
    where, fx, fy = rng.choice(_POSITIONS)
    lo, hi = _RADII[size_word]
    r = rng.uniform(lo, hi) * size
    # Jitter, then keep the whole shape inside the frame (large corner shapes move inwards).
    cx = min(max(fx * size + rng.uniform(-0.04, 0.04) * size, r + 1), size - r - 1)
    cy = min(max(fy * size + rng.uniform(-0.04, 0.04) * size, r + 1), size - r - 1)
    angle = rng.uniform(-_TILT[shape], _TILT[shape])
    if shape == "bar" and rng.random() < 0.5:
        angle += 90  # upright bars too, so "bar" is not just "wide"
    alpha = _mask(shape, cx, cy, r, angle, size)[..., None]  # [S, S, 1]
    fg = np.array([c + rng.uniform(-12, 12) for c in rgb], dtype=np.float32)  # [3]
    pixels = _background(rng, size) * (1.0 - alpha) + fg * alpha  # [S, S, 3]
    # Sensor-like noise over everything, from the scene's own stream so it is reproducible.
    amp = rng.uniform(4, 12)
    noise = np.frombuffer(rng.randbytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3)
    pixels = pixels + (noise.astype(np.float32) / 127.5 - 1.0) * amp
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    caption = rng.choice(_TEMPLATES).format(size=size_word, colour=colour, where=where)
    return image, caption, {"shape": shape, "colour": colour, "size": size_word, "position": where}


def draw_scene(rng: random.Random, size: int = 32) -> tuple[Image.Image, int, str]:
    """Draw one random scene: a shape of a random class on a noisy background.

    Args:
        rng: The only source of randomness; the same state gives the same scene.
        size: Side of the square image in pixels.

    Returns:
        ``(image, label, caption)``: an RGB image, the index of its shape in
        ``CLASSES``, and a caption naming its colour, size and position (not its shape).
    """
    image, label, caption, _ = _random_scene(rng, size)
    return image, label, caption


def _random_scene(rng: random.Random, size: int) -> tuple[Image.Image, int, str, dict[str, str]]:
    label = rng.randrange(len(CLASSES))
    image, caption, attrs = _scene(rng, size, label)
    return image, label, caption, attrs


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def _rng(seed: int, kind: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"{seed}/{kind}/{index}")


def _attr_row(root: Path, path: Path, source: str, attrs: dict[str, str]) -> str:
    return json.dumps({"image": path.relative_to(root).as_posix(), "source": source, **attrs}) + "\n"


def _write_labelled(root: Path, kind: str, count: int, size: int, seed: int, rows: list[str]) -> set[Path]:
    written = set()
    for i in range(count):
        label = i % len(CLASSES)  # round-robin: every class gets count // len(CLASSES) or one more
        image, _, attrs = _scene(_rng(seed, kind, i), size, label)
        path = root / kind / CLASSES[label] / f"{i:06d}.png"
        path.write_bytes(_encode(image, "PNG"))
        written.add(path)
        rows.append(_attr_row(root, path, kind, attrs))
    return written


def _check_root(root: Path) -> None:
    """Refuse a folder that holds data not written by this module, since stale files get pruned."""
    manifest = root / "demo.json"
    if manifest.is_file():
        try:
            ours = str(json.loads(manifest.read_text()).get("generator", "")).startswith("m3i.demo/")
        except (ValueError, AttributeError):
            ours = False
        if ours:
            return
    names = ("labelled", "captioned", "unlabelled", "eval", "captions.jsonl", "attributes.jsonl", "demo.json")
    taken = [n for n in names if (root / n).exists()]
    if taken:
        raise ValueError(
            f"demo root {str(root)!r} already holds {taken} not written by m3i demo-data; "
            "choose an empty or new folder"
        )


def make_demo_data(
    root: str | os.PathLike,
    counts: DemoCounts = DemoCounts(),
    seed: int = 0,
) -> dict[str, str]:
    """Write the demo data set under ``root`` (layout in the module docstring).

    Every run rewrites every file, and the bytes are a function of (seed, counts) alone,
    so a second run into the same root is a no-op in content. Images left over from an
    earlier run with larger counts are removed so the sources match ``counts`` exactly.
    ``demo.json`` is written first marked incomplete and last marked complete, so an
    interrupted run can be rerun into the same root.

    Args:
        root: Folder to write into; created if missing. It must be empty, new, or hold an
            earlier demo data set.
        counts: Images per source and their size.
        seed: Seed of every image; the same seed gives byte-identical files.

    Returns:
        Absolute paths by key: ``labelled`` and ``eval`` (class-folder roots),
        ``captions`` (the JSONL file), ``unlabelled`` (folder), ``attributes`` (``attributes.jsonl``)
        and ``manifest`` (``demo.json``).

    Raises:
        ValueError: If ``root`` holds data that an earlier demo run did not write.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _check_root(root)
    rel = {"labelled": "labelled", "captions": "captions.jsonl", "unlabelled": "unlabelled", "eval": "eval", "attributes": "attributes.jsonl"}
    manifest_path = root / "demo.json"
    manifest = {
        "generator": _GENERATOR,
        "complete": False,
        "seed": seed,
        "counts": asdict(counts),
        "classes": list(CLASSES),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        # Relative to demo.json, so the folder can be moved or uploaded as a whole.
        "paths": rel,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    for kind in ("labelled", "eval"):
        for name in CLASSES:
            (root / kind / name).mkdir(parents=True, exist_ok=True)
    for kind in ("captioned", "unlabelled"):
        (root / kind).mkdir(parents=True, exist_ok=True)

    rows: list[str] = []
    written = _write_labelled(root, "labelled", counts.labelled, counts.size, seed, rows)
    written |= _write_labelled(root, "eval", counts.eval, counts.size, seed, rows)

    lines = []
    for i in range(counts.captioned):
        image, _, caption, attrs = _random_scene(_rng(seed, "captioned", i), counts.size)
        path = root / "captioned" / f"{i:06d}.jpg"
        path.write_bytes(_encode(image, "JPEG"))
        written.add(path)
        lines.append(json.dumps({"image": f"captioned/{path.name}", "caption": caption}) + "\n")
        rows.append(_attr_row(root, path, "captioned", attrs))
    (root / "captions.jsonl").write_text("".join(lines))

    for i in range(counts.unlabelled):
        image, _, _, attrs = _random_scene(_rng(seed, "unlabelled", i), counts.size)
        path = root / "unlabelled" / f"{i:06d}.jpg"
        path.write_bytes(_encode(image, "JPEG"))
        written.add(path)
        rows.append(_attr_row(root, path, "unlabelled", attrs))
    (root / "attributes.jsonl").write_text("".join(rows))

    for kind in ("labelled", "captioned", "unlabelled", "eval"):
        for path in (root / kind).rglob("*"):
            if path.is_file() and path.suffix in (".png", ".jpg") and path not in written:
                path.unlink()

    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return {
        "labelled": str(root / rel["labelled"]),
        "captions": str(root / rel["captions"]),
        "unlabelled": str(root / rel["unlabelled"]),
        "eval": str(root / rel["eval"]),
        "attributes": str(root / rel["attributes"]),
        "manifest": str(manifest_path),
    }
