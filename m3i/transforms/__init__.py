"""Per-sample transforms: two augmented views with their relative geometry and a block mask.

    transform = build_transform(cfg, train=True)
    item = transform(sample, generator)   # {"v1", "v2", "geom", "mask", "cls", "tokens", "has_txt"}

Images come out as uint8 pixels; ``m3i.data.to_device(batch, device, dtype)`` normalises a
collated batch on the device.
"""

from m3i.transforms.geometry import CropBox, render_view, sample_crop, view_geometry
from m3i.transforms.masking import block_mask, num_masked
from m3i.transforms.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TwoViewTransform,
    build_transform,
    to_uint8,
)

__all__ = [
    "CropBox",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TwoViewTransform",
    "block_mask",
    "build_transform",
    "num_masked",
    "render_view",
    "sample_crop",
    "to_uint8",
    "view_geometry",
]
