"""Frozen features of every labelled sample of a split, each read exactly once.

The training loader is the wrong tool here: it drops remainders, pads failures and
shuffles. This is a plain sequential pass over the split's shards (webdataset's tar
iterators through :func:`m3i.data.open_url`), shards dealt round-robin to DataLoader
workers, and a count check against the index at the end.

Workers hand over uint8 images; each batch is normalised with the model's own mean and std
on the device the module's weights are on (:func:`m3i.data.to_device`), where the forward
pass runs too. The features come back to the CPU once per split.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from m3i.artifacts.dataset import ShardIndex, ShardInfo, check_shards, read_index
from m3i.config import Config, DataConfig
from m3i.data import decode_sample, open_url, to_device
from m3i.data.device import pin_memory_for
from m3i.models.pretrained import Encoder, embed
from m3i.storage import open_store
from m3i.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = [
    "EvalView",
    "Features",
    "LabelledSplit",
    "eval_transform",
    "extract_features",
    "labelled_count",
    "read_split_index",
]

log = logging.getLogger(__name__)

LABELLED = "labelled"
"""The source whose samples carry ``cls`` (see ``m3i shard``)."""


@dataclass
class Features:
    """Embeddings of a split's labelled samples."""

    features: torch.Tensor
    """``FloatTensor[N, D]``."""
    labels: torch.Tensor
    """``LongTensor[N]``, class indices into the index's class list."""
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.numel())


class EvalView:
    """The eval view at the model's crop (uint8 pixels), with the normalisation the model expects.

    Calling it gives :class:`m3i.transforms.EvalTransform`'s ``{"image": uint8 [3, S, S], "cls"}``;
    :func:`extract_features` and :func:`m3i.evaluate.finetune` normalise the batches with
    :attr:`mean` and :attr:`std` on the device.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float) -> None:
        cfg = dataclasses.replace(Config(), data=DataConfig(image_size=image_size))
        self.base = EvalTransform(cfg, crop_pct)
        self.mean = tuple(float(v) for v in mean)
        """Per-channel mean of the model's input normalisation."""
        self.std = tuple(float(v) for v in std)
        """Per-channel std."""

    def __call__(self, sample: dict[str, Any], gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.base(sample, gen)


def eval_transform(encoder: Encoder) -> EvalView:
    """The deterministic eval view (resize, centre crop) at the encoder's size, crop and normalisation."""
    return EvalView(encoder.image_size, encoder.mean, encoder.std, encoder.crop_pct)


class LabelledSplit(IterableDataset):
    """Every sample with ``cls >= 0`` of the given shards, once, transformed; shards split among workers.

    Args:
        base_uri: Data set root the shard keys hang under.
        shards: The split's shards (from the index).
        transform: ``transform(sample, None) -> {"image", "cls"}``.
    """

    def __init__(self, base_uri: str, shards: list[ShardInfo], transform: Callable) -> None:
        self.base_uri = base_uri.rstrip("/")
        self.shards = [s for s in shards if s.sources.get(LABELLED, 0) > 0]
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, shard in enumerate(self.shards):
            if i % workers != worker:
                continue
            url = f"{self.base_uri}/{shard.key}"
            with open_url(url) as stream:
                files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
                for raw in wds.tariterators.group_by_keys(files):
                    if "cls" not in raw:
                        continue
                    sample = decode_sample(raw)
                    if sample["cls"] >= 0:
                        yield self.transform(sample, None)


def read_split_index(shards_uri: str) -> ShardIndex:
    """The data set's index (class names, splits)."""
    return read_index(open_store(shards_uri))


def labelled_count(index: ShardIndex, split: str) -> int:
    """Labelled samples of ``split`` according to the index."""
    return sum(s.sources.get(LABELLED, 0) for s in index.shards(split))


@torch.no_grad()
def extract_features(
    module: nn.Module,
    index: ShardIndex,
    split: str,
    transform: Callable,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = embed,
    device: torch.device | str | None = None,
) -> Features:
    """Embed every labelled sample of ``split`` with ``module`` in eval mode.

    Batches are normalised with ``transform.mean`` and ``transform.std`` (an :class:`EvalView`'s;
    ImageNet's for a transform without them) on ``device`` and embedded there.

    Args:
        module: The encoder (a timm ViT for the default ``forward``).
        index: The data set's index (see :func:`read_split_index`).
        split: ``train`` or ``eval``.
        transform: The eval view (see :func:`eval_transform`), yielding uint8 images.
        batch_size: Images per forward pass.
        num_workers: DataLoader workers; shards are dealt round-robin among them.
        forward: ``forward(module, images [N, 3, S, S]) -> [N, D]``.
        device: Where the forward passes run; default: where ``module``'s parameters are.
            Batches for CUDA come from the workers in pinned memory.

    Returns:
        The :class:`Features` of the split on the CPU, in no particular order.

    Raises:
        ValueError: When the split has no labelled samples.
        m3i.artifacts.DamagedArtifactError: When shards of the split that the index lists are gone.
        RuntimeError: When fewer or more labelled samples were read than the index lists
            (a shard that does not read fully raises its own error first).
    """
    expected = labelled_count(index, split)
    if expected == 0:
        raise ValueError(f"split {split!r} of {index.uri} has no labelled samples to evaluate on")
    check_shards(open_store(index.uri), index, split)  # a deleted shard: one line naming it, before any worker starts
    was_training = module.training
    module.eval()
    t0 = time.monotonic()
    if device is None:
        device = next(iter(module.parameters()), torch.empty(0)).device
    mean, std = getattr(transform, "mean", IMAGENET_MEAN), getattr(transform, "std", IMAGENET_STD)
    ds = LabelledSplit(index.uri, index.shards(split), transform)
    dl = DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, prefetch_factor=2 if num_workers else None,
        pin_memory=pin_memory_for(device),
    )
    feats, labels = [], []
    try:
        for batch in dl:
            images = to_device({"image": batch["image"]}, device, None, mean, std)["image"]
            feats.append(forward(module, images).float())  # [B, D], on the device until the end
            labels.append(batch["cls"])
    finally:
        module.train(was_training)
    features = torch.cat(feats).cpu() if feats else torch.empty(0)  # one copy back (and sync) per split
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if len(y) != expected:
        raise RuntimeError(f"read {len(y)} labelled samples of split {split!r} of {index.uri}; its index lists {expected}")
    return Features(features, y, time.monotonic() - t0)
