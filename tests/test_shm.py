"""/dev/shm at launch: bytes per sample from the real transform, the loaders' need, refusal and warning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import m3i.launch.shm as shm_mod
from m3i.config import LaunchConfig, load_config
from m3i.data.loader import ShardLoader
from m3i.launch.shm import PREFETCH_FACTOR, check_shm, estimate_shm, sample_bytes
from m3i.transforms import build_transform
from tests.helpers import shard_small, small_demo

K8S = LaunchConfig(scheduler="kubernetes", gpus_per_node=8, memory="900Gi", shm_size="64Gi")


def _bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shm")
    shard_small(small_demo(root / "raw"), str(root / "shards"))
    return str(root / "shards")


def test_sample_bytes_are_what_the_loader_hands_over(shards):
    """Measured from the run's own transform: a real batch of the loader holds batch_size times as many bytes."""
    cfg = load_config("demo", None, [f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0"])
    loader = ShardLoader(cfg.data, build_transform(cfg, train=True))
    batch = next(iter(loader))
    assert _bytes(batch) == cfg.data.batch_size * sample_bytes(cfg)


def test_prefetch_factor_is_the_loaders(shards):
    cfg = load_config("demo", None, [f"data.shards={shards}", "data.num_workers=1", "data.batch_size=4"])
    loader = ShardLoader(cfg.data)
    assert loader._make_dataloader().prefetch_factor == PREFETCH_FACTOR  # the DataLoader is made, no worker starts


def test_each_element_counts_its_own_bytes():
    """uint8 pixels are one byte each, float32 four, int64 eight: the transform's outputs decide."""
    cfg = load_config("demo", None, [])
    s = cfg.data.image_size

    def transform(sample, gen):
        return {"v1": torch.zeros(3, s, s, dtype=torch.uint8), "v2": torch.zeros(3, s, s), "cls": torch.tensor(0),
                "key": sample["key"]}

    assert sample_bytes(cfg, transform) == 3 * s * s + 4 * 3 * s * s + 8


def test_the_need_is_ranks_times_prefetched_batches():
    cfg = load_config("default", None, ["data.batch_size=64", "data.num_workers=4"])
    est = estimate_shm(K8S, cfg, per_sample=1000)
    assert (est.ranks, est.workers, est.prefetch, est.batch_bytes) == (8, 4, PREFETCH_FACTOR, 64_000)
    assert est.need == 8 * (4 * PREFETCH_FACTOR + 1) * 64_000 and est.capacity == 64 * 2**30 and est.level == "ok"
    # No workers: the rank decodes itself, nothing goes through shared memory.
    assert estimate_shm(K8S, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0)), per_sample=1000).need == 0


def test_local_runs_count_every_replica_against_free_space_here(monkeypatch):
    monkeypatch.setattr(shm_mod, "_free_bytes", lambda path: 10_000_000 if path == "/dev/shm" else None)
    cfg = load_config("demo", None, ["data.batch_size=10", "data.num_workers=2"])
    est = estimate_shm(LaunchConfig(nodes=2, nproc_per_node=3), cfg, per_sample=1000)
    assert est.ranks == 6 and est.capacity == 10_000_000 and est.need == 6 * 5 * 10_000
    monkeypatch.setattr(shm_mod, "_free_bytes", lambda path: None)  # no /dev/shm on this system: no check
    assert check_shm(LaunchConfig(), cfg, per_sample=10**9) is None


def test_over_is_refused_and_tight_is_said_with_the_numbers():
    cfg = load_config("default", None, ["data.batch_size=64", "data.num_workers=4"])
    need = 8 * (4 * PREFETCH_FACTOR + 1) * 64 * 1000  # 4.6 MB
    with pytest.raises(ValueError) as e:
        check_shm(dataclasses.replace(K8S, shm_size=str(need - 1)), cfg, per_sample=1000)
    msg = str(e.value)
    assert msg.startswith("the loaders would not fit in /dev/shm: 8 rank(s) x (4 loader workers x prefetch 2 + 1) batches")
    assert "62.5 KiB a batch" in msg and "lower data.num_workers or data.batch_size, or raise launch.shm_size" in msg
    warning = check_shm(dataclasses.replace(K8S, shm_size=str(int(need * 1.5))), cfg, per_sample=1000)
    assert warning and warning.startswith("/dev/shm is tight") and "launch.shm_size of each pod: 6.6 MiB" in warning
    assert check_shm(dataclasses.replace(K8S, shm_size=str(need * 3)), cfg, per_sample=1000) is None


def test_m3i_launch_checks_shm_before_anything_starts(capsys):
    from m3i.cli import main

    train = ["--preset", "default", "--set", "data.batch_size=64", "--set", "data.num_workers=4"]
    need = 8 * (4 * PREFETCH_FACTOR + 1) * 64 * sample_bytes(load_config("default", None, ["data.batch_size=64", "data.num_workers=4"]))
    base = ["launch", "--scheduler", "kubernetes", "--gpus-per-node", "8", "--set", "launch.memory=900Gi"]
    assert main([*base, "--set", f"launch.shm_size={need // 2}", "--dryrun", "--", *train]) == 2
    assert "m3i launch: error: the loaders would not fit in /dev/shm: 8 rank(s)" in capsys.readouterr().err
    assert main([*base, "--set", f"launch.shm_size={need * 3 // 2}", "--dryrun", "--", *train]) == 0
    out = capsys.readouterr()
    assert "m3i launch: warning: /dev/shm is tight" in out.err and "kind: Job" in out.out
