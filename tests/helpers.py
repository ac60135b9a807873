"""Small builders shared by the data-plane tests."""

from __future__ import annotations

import io
import os
import shlex
import tarfile
from pathlib import Path
from typing import Any

import torch

from m3i.config import DataConfig, ShardConfig
from m3i.demo import DemoCounts, make_demo_data
from m3i.shard import shard


class PlantedPickle:
    """What an attacker would pickle: unpickling it runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


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


# A model small enough for a few-second CPU run (the m3i_vit_micro variant, 32 px, patch 8).
TINY_TRAIN = {
    "model": {
        "backbone": "m3i_vit_micro",
        "patch_size": 8,
        "proj_dim": 32,
        "predictor_depth": 1,
        "predictor_heads": 4,
        "embed_dim": 32,
        "text_width": 32,
        "text_depth": 1,
        "text_heads": 4,
        "text_max_len": 24,
        "ema_m0": 0.99,
    },
    "data": {"image_size": 32, "batch_size": 8, "num_workers": 1, "shuffle_buffer": 8},
    "train": {"steps": 6, "warmup_steps": 2, "log_every": 1},
    "checkpoint": {"interval_steps": 2, "keep_last": 2},
    "metrics": {"port": 0},
}


def write_train_config(path: Path, shards: str, output: str, **sections: dict[str, Any]) -> Path:
    """A YAML config of TINY_TRAIN with the data set, the output and per-section overrides."""
    import copy

    import yaml

    cfg = copy.deepcopy(TINY_TRAIN)
    cfg["data"]["shards"] = shards
    cfg["train"]["output"] = output
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun_cmd(config: Path, nproc: int = 2, *extra: str) -> list[str]:
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "m3i", "-q", "train", "--config", str(config), *extra,
    ]


def train_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def final_weights(output: Path, step: int) -> dict[str, Any]:
    import torch

    sd = torch.load(output / "checkpoints" / f"step-{step:08d}" / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    return sd["module"]


def one_rank_here(monkeypatch) -> None:
    """The environment of a one-rank job in this process (a pytest ``MonkeyPatch``)."""
    from tests.conftest import free_port

    for k, v in train_env().items():
        if k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(k, "1" if k == "WORLD_SIZE" else "0")
