"""Photometric augmentation drawn from a ``torch.Generator``. [sim: BYOL-style, as SiameseIM]"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from m3i.transforms.geometry import uniform

__all__ = ["ColorAugment"]


class ColorAugment:
    """Colour jitter (random order), greyscale, Gaussian blur and solarisation of one view.

    Args:
        jitter: Brightness and contrast strength; saturation gets half, hue a quarter. 0 turns jitter off.
        jitter_prob: Probability of jitter.
        grayscale_prob: Probability of greyscale.
        blur_prob: Probability of Gaussian blur.
        solarize_prob: Probability of solarisation.
        image_size: Side of the view; blur sigma (0.1-2.0 at 224 px) scales with it.
    """

    def __init__(
        self,
        jitter: float,
        jitter_prob: float,
        grayscale_prob: float,
        blur_prob: float,
        solarize_prob: float,
        image_size: int,
    ) -> None:
        self.jitter = jitter
        self.jitter_prob = jitter_prob
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.solarize_prob = solarize_prob
        self.sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)

    def _happens(self, gen: torch.Generator, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=gen)) < p

    def __call__(self, img: Image.Image, gen: torch.Generator) -> Image.Image:
        """Augment ``img`` with randomness from ``gen`` alone."""
        s = self.jitter
        if s > 0 and self._happens(gen, self.jitter_prob):
            ops = (
                lambda x: TF.adjust_brightness(x, uniform(gen, 1 - s, 1 + s)),
                lambda x: TF.adjust_contrast(x, uniform(gen, 1 - s, 1 + s)),
                lambda x: TF.adjust_saturation(x, uniform(gen, 1 - s / 2, 1 + s / 2)),
                lambda x: TF.adjust_hue(x, uniform(gen, -s / 4, s / 4)),
            )
            for k in torch.randperm(4, generator=gen).tolist():
                img = ops[k](img)
        if self._happens(gen, self.grayscale_prob):
            img = TF.to_grayscale(img, num_output_channels=3)
        if self._happens(gen, self.blur_prob):
            img = img.filter(ImageFilter.GaussianBlur(radius=uniform(gen, *self.sigma)))
        if self._happens(gen, self.solarize_prob):
            img = ImageOps.solarize(img, threshold=128)
        return img
