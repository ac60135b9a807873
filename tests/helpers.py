"""Small builders shared by the data-plane tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import torch

from m3i.config import DataConfig, ShardConfig
from m3i.demo import DemoCounts, make_demo_data
from m3i.shard import shard

SMALL = DemoCounts(labelled=48, captioned=32, unlabelled=16, eval=16, size=32)


def small_demo(root: Path) -> dict[str, str]:
    return make_demo_data(root, SMALL, seed=0)


def shard_cfg(paths: dict[str, str], out: str, **kw: Any) -> ShardConfig:
    base = dict(
        out=out,
        labelled=(paths["labelled"],),
        captions=(paths["captions"],),
        unlabelled=(paths["unlabelled"],),
        eval_labelled=(paths["eval"],),
        max_samples_per_shard=10,
        workers=2,
    )
    base.update(kw)
    return ShardConfig(**base)


def shard_small(paths: dict[str, str], out: str, **kw: Any):
    return shard(shard_cfg(paths, out, **kw), progress=False)


def data_cfg(shards: str, **kw: Any) -> DataConfig:
    base = dict(shards=shards, image_size=32, batch_size=4, num_workers=0, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


class KeyTransform:
    """Keeps what tests compare: the key, the source, and a draw from the sample's generator."""

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        return {
            "key": sample["key"],
            "source": sample["source"],
            "cls": sample["cls"],
            "txt": sample["txt"],
            "draw": torch.rand(1, generator=generator),
        }


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def jpeg_bytes(path: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()
