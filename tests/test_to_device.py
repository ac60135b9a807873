"""The uint8 hand-off: workers yield pixels, m3i.data.to_device normalises on the device, pinned for CUDA."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from m3i.config import load_config
from m3i.data import ImageTransform, ShardLoader, normalize, to_device
from m3i.data.device import current_device
from m3i.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from tests.helpers import KeyTransform, data_cfg, shard_small, small_demo

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def workers_float(pixels: torch.Tensor) -> torch.Tensor:
    """What the loader workers made of these pixels before the uint8 hand-off (the old ``to_tensor``)."""
    x = pixels.float().div_(255.0)
    return (x - MEAN) / STD


def scene(seed: int, size: tuple[int, int] = (90, 70)) -> dict:
    """A sample with a noisy colour image: every augmentation changes some pixels."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return {"image": Image.fromarray(rgb), "cls": seed % 3 - 1, "txt": "a red circle" if seed % 2 else "", "source": "x", "key": f"k{seed}"}


def train_batch(*overrides: str) -> dict:
    cfg = load_config(None, overrides=["data.image_size=32", "model.patch_size=8", *overrides])
    t = build_transform(cfg)
    return default_collate([t(scene(s), torch.Generator().manual_seed(s)) for s in range(6)])


# ----------------------------------------------------------------------------- to_device


def test_the_device_batch_is_the_float_batch_the_workers_made():
    batch = train_batch("objective.grayscale_prob=0.5", "objective.solarize_prob=[0.5, 0.5]")
    assert batch["v1"].dtype == batch["v2"].dtype == torch.uint8
    out = to_device(batch, "cpu")
    for k in ("v1", "v2"):  # the same float32 operations in the same order: bit-identical
        assert out[k].dtype == torch.float32 and torch.equal(out[k], workers_float(batch[k])), k
    for k in ("geom", "mask", "cls", "tokens", "has_txt"):
        assert out[k].dtype == batch[k].dtype and torch.equal(out[k], batch[k]), k
    assert batch["v1"].dtype == torch.uint8  # the input batch is left alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_batches_are_the_float_batch_rounded(dtype):
    batch = {**train_batch(), "key": ["a", "b"]}
    out = to_device(batch, torch.device("cpu"), dtype)
    for k in ("v1", "v2"):
        assert out[k].dtype == dtype and torch.equal(out[k], workers_float(batch[k]).to(dtype)), k
    assert out["geom"].dtype == torch.float32 and torch.equal(out["geom"], batch["geom"])  # positions stay exact
    assert out["mask"].dtype == torch.bool and out["tokens"].dtype == torch.long and out["cls"].dtype == torch.long
    assert out["key"] == ["a", "b"]  # not a tensor: passed through


def test_a_models_own_mean_and_std():
    pixels = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = to_device({"image": pixels}, "cpu", None, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))["image"]
    want = (pixels.double() / 255 - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1).double()) / torch.tensor([0.5, 0.25, 1.0]).view(3, 1, 1).double()
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_normalize_takes_only_pixels():
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2))


def test_image_transform_hands_over_pixels():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    x = ImageTransform(24)({"image": img, "cls": 2})["image"]
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24)
    resized = img.resize((24, 32), Image.BILINEAR).crop((0, 4, 24, 28))
    assert torch.equal(x, torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))


# ----------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("to_device")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


class Keyed:
    """The training transform plus the sample's key (picklable, for the workers)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, sample, gen):
        return {**self.transform(sample, gen), "key": sample["key"]}


def test_worker_batches_are_pixels_and_the_same_as_in_process(shards):
    cfg = load_config(None, overrides=["data.image_size=32", "model.patch_size=8"])
    transform = Keyed(build_transform(cfg))
    per_sample = {}
    for workers in (0, 2):
        loader = ShardLoader(data_cfg(shards, batch_size=8, num_workers=workers, shuffle_buffer=8), transform)
        try:
            seen = {}
            for b in loader:
                assert b["v1"].dtype == b["v2"].dtype == torch.uint8 and b["v1"].shape == (8, 3, 32, 32)
                for i, key in enumerate(b["key"]):
                    seen[key] = {k: b[k][i] for k in ("v1", "v2", "geom", "mask", "tokens")}
            per_sample[workers] = seen
        finally:
            loader.close()
    common = per_sample[0].keys() & per_sample[2].keys()
    assert len(common) > 50
    for key in common:  # the same views of a sample whichever process made them
        a, b = per_sample[0][key], per_sample[2][key]
        assert all(torch.equal(a[k], b[k]) for k in a), key


@pytest.mark.parametrize("device, pinned", [("cuda", True), (torch.device("cuda", 1), True), ("cpu", False)])
def test_pin_memory_follows_the_device_and_nothing_else_touches_cuda(shards, monkeypatch, device, pinned):
    def no_cuda(*_a, **_k):
        raise AssertionError("the loader initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    loader = ShardLoader(data_cfg(shards, batch_size=4, num_workers=2), KeyTransform(), device=device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keys = [list(b["key"]) for b in loader]  # a whole epoch; without a GPU torch itself skips pinning
        assert loader._dataloader.pin_memory is pinned
        assert any("'pin_memory'" in str(w.message) for w in caught) is pinned  # torch: "... no accelerator ..."
        assert len(keys) == len(loader)
    finally:
        loader.close()


def test_an_unnamed_device_is_the_one_cuda_was_set_to(shards, monkeypatch):
    loader = ShardLoader(data_cfg(shards), KeyTransform())
    assert current_device() == torch.device("cpu") and loader._make_dataloader().pin_memory is False
    # What init_distributed leaves behind on a GPU rank: CUDA initialised, the rank's device current.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert current_device() == torch.device("cuda", 3) and loader._make_dataloader().pin_memory is True
