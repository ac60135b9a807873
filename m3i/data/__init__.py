"""Streaming over ``m3i shard`` data sets, local or ``s3://``: training batches and evaluation passes."""

from m3i.data.dataset import decode_image, decode_sample
from m3i.data.device import IMAGENET_MEAN, IMAGENET_STD, normalize, resolve_device, to_device
from m3i.data.gopen import open_url, register_s3_scheme
from m3i.data.loader import ImageTransform, ShardLoader, build_loader
from m3i.data.plan import EpochPlan, derive_seed

__all__ = [
    "EpochPlan",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTransform",
    "ShardLoader",
    "build_loader",
    "decode_image",
    "decode_sample",
    "derive_seed",
    "normalize",
    "open_url",
    "register_s3_scheme",
    "resolve_device",
    "to_device",
]
