"""The host-to-device hand-off: uint8 images from the loader, normalised where the model runs.

Loader workers yield images as ``uint8`` tensors (``[N, 3, S, S]``, the augmented pixels
exactly as PIL left them): a quarter of the bytes of float32 through the workers' shared
memory and, on CUDA, through the pinned host-to-device copy. :func:`to_device` is the one
place that turns them into model inputs: ``x / 255``, minus the mean, over the std, in
float32 on the target device, then cast to the run's precision.

    batch = to_device(batch, torch.device("cuda", 0), torch.bfloat16)        # training
    batch = to_device(batch, "cpu", None, mean=enc.mean, std=enc.std)        # evaluation, the model's own
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch

from m3i.config.evaluate import DEVICES

__all__ = [
    "DEVICES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "current_device",
    "normalize",
    "pin_memory_for",
    "resolve_device",
    "to_device",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



@functools.lru_cache(maxsize=16)
def _stats(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as ``[C, 1, 1]`` float32 tensors on ``device``, made once per device.

    Cached: building them every step would be a small synchronous host-to-device copy per batch.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).to(device)
    return m, s


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``uint8`` images ``[..., C, H, W]`` as normalised floats on their own device.

    ``(x / 255 - mean) / std`` in float32, the same operations in the same order as the
    transforms applied in the loader workers before, so a CPU result is bit-identical to
    theirs; then cast to ``dtype`` (``None`` keeps float32).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    m, s = _stats(images.device, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    x = images.float().div_(255.0).sub_(m).div_(s)
    return x if dtype is None or dtype == torch.float32 else x.to(dtype)


def to_device(
    batch: dict[str, Any],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """A collated batch on ``device``, images normalised and cast to ``dtype``.

    - ``uint8`` tensors of 3 or more dimensions are images (``[N, C, H, W]``; nothing else in a
      batch is ``uint8``): copied as uint8, then :func:`normalize`-d on the device.
    - Other floating tensors (view geometry) stay float32: the model builds positions from them in
      float32 itself, and bf16 would round a crop offset by up to 0.4 %.
    - Integer and bool tensors (labels, masks, tokens) keep their dtype; non-tensors pass through.

    Copies are ``non_blocking``: from a pinned batch (``ShardLoader`` on CUDA) they overlap with
    the work already queued on the device.

    Args:
        batch: ``{name: tensor or anything}`` as the loader yields it.
        device: Where the model runs.
        dtype: The run's precision (``torch.bfloat16``, ``torch.float16``); ``None`` is float32.
        mean: Per-channel mean of the model's input normalisation (ImageNet's by default).
        std: Per-channel std.

    Returns:
        A new dict; ``batch`` is not changed.
    """
    device = torch.device(device)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.dtype == torch.uint8 and v.ndim >= 3:
                v = normalize(v, mean, std, dtype)
        out[k] = v
    return out


def current_device() -> torch.device:
    """The device this process computes on, as far as torch knows without initialising CUDA.

    CUDA's current device when this process has initialised CUDA (``m3i.train.dist.init_distributed``
    does, by selecting the rank's GPU, before the training loader is built), else the CPU.
    ``torch.cuda.is_initialized`` only reads a flag, so asking never starts CUDA.
    """
    if torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pin_memory_for(device: torch.device | str) -> bool:
    """Whether batches bound for ``device`` should come from the loader in pinned host memory.

    Only CUDA copies gain from it (``non_blocking`` copies of pageable memory are synchronous);
    pinning for the CPU would only cost a copy per batch.
    """
    return torch.device(device).type == "cuda"


def _cuda_facts() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}, "
        f"{torch.cuda.device_count()} device(s) visible"
        + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
    )


def resolve_device(name: str, key: str = "evaluate.device") -> torch.device:
    """The device a setting names: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Args:
        name: One of :data:`DEVICES`.
        key: The setting's name, for the error message.

    Raises:
        ValueError: For another name, or for ``cuda`` where torch finds no usable CUDA device.
    """
    if name not in DEVICES:
        raise ValueError(f"{key}={name!r} is not a device; allowed: {list(DEVICES)}")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise ValueError(
            f"{key}='cuda' but CUDA is not available here ({_cuda_facts()}); "
            "allowed: 'auto' (CUDA when available, else the CPU) or 'cpu'"
        )
    return torch.device("cpu")
