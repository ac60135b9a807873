"""Random resized crops, flips, and the geometry of one view inside another.

Coordinates are normalised to the view: ``(u, v)`` in ``[0, 1]^2``, ``u`` to the right
and ``v`` down, measured at pixel centres the way PIL's ``resize(box=...)`` samples.
The geometry of v2 relative to v1 is the affine map that takes a point of v2 to the
same point of the original image expressed in v1's coordinates::

    y1 = oy + sy * v
    x1 = ox + (1 - 2 * flip) * sx * u

so ``geom = (oy, ox, sy, sx, flip)``: crop offset, scale and relative flip. [sim: the same
quantities as SiameseIM's ``(i2-i1)/h1, (j2-j1)/w1, h2/h1, w2/w1, relative_flip``,
written as one map so that crops and flips compose in any order.]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

__all__ = ["CropBox", "sample_crop", "render_view", "view_geometry", "uniform"]


@dataclass(frozen=True)
class CropBox:
    """A crop of the original image in pixels: top ``i``, left ``j``, height ``h``, width ``w``."""

    i: float
    j: float
    h: float
    w: float


def uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    """One number drawn uniformly from ``[lo, hi)`` with ``gen`` alone."""
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def sample_crop(
    gen: torch.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> CropBox:
    """A random resized crop box, as torchvision's ``RandomResizedCrop.get_params``.

    Ten tries at a box of area fraction in ``scale`` and aspect in ``ratio`` (log-uniform);
    failing that, the largest centred box within ``ratio``.

    Args:
        gen: The only source of randomness.
        width: Image width in pixels.
        height: Image height in pixels.
        scale: Area fraction range.
        ratio: Aspect ratio (w/h) range.

    Returns:
        The crop box in integer pixels.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * uniform(gen, scale[0], scale[1])
        aspect = math.exp(uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (), generator=gen))
            j = int(torch.randint(0, width - w + 1, (), generator=gen))
            return CropBox(i, j, h, w)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def render_view(image: Image.Image, box: CropBox, flip: bool, size: int) -> Image.Image:
    """Crop ``box`` out of ``image``, resize it to ``size`` x ``size`` (bicubic), then flip if asked."""
    out = image.resize((size, size), Image.BICUBIC, box=(box.j, box.i, box.j + box.w, box.i + box.h))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def view_geometry(box1: CropBox, flip1: bool, box2: CropBox, flip2: bool) -> torch.Tensor:
    """The map from v2's normalised coordinates to v1's (see the module docstring).

    Args:
        box1: Crop of v1 in the original image.
        flip1: Whether v1 was flipped after cropping.
        box2: Crop of v2.
        flip2: Whether v2 was flipped.

    Returns:
        ``FloatTensor[5]``: ``(oy, ox, sy, sx, flip)``.
    """
    oy = (box2.i - box1.i) / box1.h
    sy = box2.h / box1.h
    sx = box2.w / box1.w
    # x1 at u = 0: the original-image column of v2's left edge (its right edge when flipped).
    left = box2.j + (box2.w if flip2 else 0.0)
    ox = (left - box1.j) / box1.w
    if flip1:
        ox = 1.0 - ox
    rel_flip = float(flip1 != flip2)
    return torch.tensor([oy, ox, sy, sx, rel_flip], dtype=torch.float32)
