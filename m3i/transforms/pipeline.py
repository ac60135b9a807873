"""The per-sample transforms the loader calls: ``transform(sample, generator) -> dict of tensors``.

A sample is ``{"image": PIL RGB, "cls": int (-1 unlabelled), "txt": str ("" uncaptioned),
"source": str, "key": str}``; ``generator`` is seeded from (seed, epoch, key) by the
loader and is the only source of randomness, so a resumed run sees the same views.

Images leave the transforms as ``uint8`` ``[3, S, S]`` tensors: every augmentation works on
PIL images, which hold 8-bit pixels after each operation, so these are exactly the augmented
pixels. Normalisation (ImageNet mean and std) and the cast to the run's precision happen
after the batch reaches its device, in :func:`m3i.data.to_device`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from m3i.config import Config
from m3i.data.device import IMAGENET_MEAN, IMAGENET_STD
from m3i.text import build_tokenizer
from m3i.transforms.color import ColorAugment
from m3i.transforms.geometry import render_view, sample_crop, view_geometry
from m3i.transforms.masking import block_mask, num_masked

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TwoViewTransform", "EvalTransform", "build_transform", "to_uint8"]


def to_uint8(img: Image.Image) -> torch.Tensor:
    """``ByteTensor[3, H, W]`` of an RGB image's pixels (normalised later by :func:`m3i.data.to_device`)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _check_sizes(cfg: Config) -> None:
    if cfg.data.image_size % cfg.model.patch_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} is not a multiple of model.patch_size={cfg.model.patch_size}; "
            "allowed: image sizes divisible by the patch size"
        )


class TwoViewTransform:
    """Training views of one sample: two crops, their geometry, a block mask, label and tokens.

    Returns a dict that ``default_collate`` batches:

    - ``v1``, ``v2``: ``ByteTensor[3, S, S]`` pixels; v1 is the (masked / mixed) input, v2 the other
      view (normalised on the device by :func:`m3i.data.to_device`).
    - ``geom``: ``FloatTensor[5]``, v2 in v1's coordinates (see :mod:`m3i.transforms.geometry`).
    - ``mask``: ``BoolTensor[L]``, ``True`` on v1's masked patches (row-major).
    - ``cls``: ``LongTensor[]``, -1 when unlabelled.
    - ``tokens``: ``LongTensor[T]`` byte tokens; ``has_txt``: ``BoolTensor[]``.

    With ``objective.use_img`` off only ``v1`` (no ``v2``, ``geom``, ``mask``) is made.

    Args:
        cfg: The run config (``data.image_size``, ``model.patch_size``, ``model.text_max_len``, ``objective``).
    """

    def __init__(self, cfg: Config) -> None:
        _check_sizes(cfg)
        o = cfg.objective
        self.size = cfg.data.image_size
        self.grid = (self.size // cfg.model.patch_size,) * 2
        self.two_views = o.use_img
        # With mixing the "masked" patches are image B's share of the input. [paper]
        share = 1.0 - o.mix_keep if o.mix_images else o.mask_ratio
        self.count = num_masked(self.grid[0] * self.grid[1], share)
        self.min_block = o.mask_min_block
        self.scale = tuple(o.crop_scale)
        self.ratio = tuple(o.crop_ratio)
        self.flip_prob = o.flip_prob
        self.color = tuple(
            ColorAugment(
                o.color_jitter, o.color_jitter_prob, o.grayscale_prob, o.blur_prob[k], o.solarize_prob[k], self.size
            )
            for k in range(2)
        )
        self.tokenizer = build_tokenizer(cfg.model)  # model.text_encoder's, padded to model.text_max_len

    def _view(self, img: Image.Image, gen: torch.Generator, k: int):
        box = sample_crop(gen, img.width, img.height, self.scale, self.ratio)
        flip = self.flip_prob > 0 and float(torch.rand((), generator=gen)) < self.flip_prob
        view = self.color[k](render_view(img, box, flip, self.size), gen)
        return to_uint8(view), box, flip

    def __call__(self, sample: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        img = sample["image"]
        if img.mode != "RGB":
            img = img.convert("RGB")
        v1, box1, flip1 = self._view(img, gen, 0)
        out: dict[str, torch.Tensor] = {"v1": v1}
        if self.two_views:
            v2, box2, flip2 = self._view(img, gen, 1)
            out["v2"] = v2
            out["geom"] = view_geometry(box1, flip1, box2, flip2)
            out["mask"] = block_mask(gen, self.grid, self.count, self.min_block)
        txt = sample.get("txt") or ""
        out["cls"] = torch.tensor(int(sample.get("cls", -1)), dtype=torch.long)
        out["tokens"] = self.tokenizer.encode(txt)
        out["has_txt"] = torch.tensor(bool(txt.strip()))
        return out


class EvalTransform:
    """Deterministic eval view: resize the short side to ``S / crop_pct``, centre-crop ``S``.

    Returns ``{"image": ByteTensor[3, S, S], "cls": LongTensor[]}`` (normalise with
    :func:`m3i.data.to_device`); the generator is ignored.

    Args:
        cfg: The run config (``data.image_size``).
        crop_pct: Fraction of the resized short side kept by the centre crop. [choice: timm/DeiT 0.875]
    """

    def __init__(self, cfg: Config, crop_pct: float = 0.875) -> None:
        self.size = cfg.data.image_size
        self.resize = int(round(self.size / crop_pct))

    def __call__(self, sample: dict[str, Any], gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        img = sample["image"].convert("RGB")
        w, h = img.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return {"image": to_uint8(img), "cls": torch.tensor(int(sample.get("cls", -1)), dtype=torch.long)}


def build_transform(cfg: Config, train: bool = True) -> TwoViewTransform | EvalTransform:
    """The loader's per-sample transform.

    Args:
        cfg: The run config.
        train: Two augmented views with geometry and mask (``True``) or the eval view.

    Returns:
        A picklable callable ``(sample, generator) -> dict[str, Tensor]``.

    Raises:
        ValueError: If ``data.image_size`` is not a multiple of ``model.patch_size``.
    """
    return TwoViewTransform(cfg) if train else EvalTransform(cfg)
