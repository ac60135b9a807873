"""train.device: a rank told to use CUDA that cannot stops with one line; a CPU rank sees no GPU.

The facts a rank reads (env, /dev/nvidia*, the driver file, torch) are faked where this
machine has no GPU; the last test runs the real ``m3i train`` with GPUs asked for and none
visible.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import m3i.train.dist as dist_mod
from m3i.config import load_config
from m3i.train.dist import DeviceFacts, DeviceUnavailable, cuda_unusable_message, gather_device_facts, select_device

# The first line of a real /proc/driver/nvidia/version (proprietary and open kernel modules).
DRIVER_LINES = {
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.161.08  Tue Mar  5 22:42:15 UTC 2024\n": "535.161.08",
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16-I3-B03-4-3)\n": "570.86.15",
}
TOO_OLD = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). Please update your "
           "GPU driver by downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx")


def facts(**kw) -> DeviceFacts:
    base = dict(cuda_visible_devices=None, nvidia_visible_devices="GPU-1234,GPU-5678", device_files=("nvidia0", "nvidia1", "nvidiactl"),
                driver="535.161.08", torch_version="2.14.1+cu130", torch_cuda="13.0", device_count=0, reason=TOO_OLD)
    base.update(kw)
    return DeviceFacts(**base)


# --- the message, from faked facts ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, rank, needles",
    [
        ({}, 0, ["NVIDIA_VISIBLE_DEVICES='GPU-1234,GPU-5678'", "/dev/nvidia* present (nvidia0, nvidia1, nvidiactl)",
                 "driver 535.161.08", "built for CUDA 13.0", "torch sees 0 GPUs", "torch says: CUDA initialization: The NVIDIA driver",
                 "driver 535.161.08 may be older than CUDA 13.0 needs"]),
        ({"cuda_visible_devices": "", "reason": None}, 0, ["CUDA_VISIBLE_DEVICES='' (no GPU)", "hides every GPU"]),
        ({"nvidia_visible_devices": None, "device_files": (), "driver": None, "reason": None}, 0,
         ["NVIDIA_VISIBLE_DEVICES unset", "/dev/nvidia* absent", "driver unknown", "no GPU reached this container",
          "nvidia.com/gpu"]),
        ({"device_count": 2, "reason": None}, 3, ["torch sees 2 GPUs", "local rank 3 has no GPU of its own"]),
        ({"torch_cuda": None, "reason": None}, 0, ["built without CUDA", "install a CUDA build of torch"]),
        ({"driver": None, "reason": None}, 0, ["no NVIDIA kernel driver is loaded"]),
    ],
)
def test_the_message_is_one_line_naming_what_the_rank_sees(kw, rank, needles):
    msg = cuda_unusable_message(facts(**kw), rank)
    assert "\n" not in msg and msg.startswith(f"train.device=cuda but CUDA is unusable on local rank {rank}: ")
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "torch 2.14.1+cu130" in msg


def test_long_device_lists_and_reasons_stay_short():
    msg = cuda_unusable_message(facts(device_files=tuple(f"nvidia{i}" for i in range(16)), reason="x" * 5000))
    assert "nvidia5 and 10 more" in msg and len(msg) < 900


# --- gathering the facts ------------------------------------------------------------------------


@pytest.mark.parametrize("line, version", DRIVER_LINES.items())
def test_facts_read_the_driver_device_files_and_torchs_warning(line, version, tmp_path, monkeypatch):
    (tmp_path / "version").write_text(line + "GCC version:  gcc version 12.2.0\n")
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    monkeypatch.setattr(dist_mod, "DRIVER_VERSION_FILE", str(tmp_path / "version"))
    monkeypatch.setattr(dist_mod, "DEVICE_FILES", str(tmp_path / "nvidia*"))
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def too_old() -> bool:  # what torch does on a driver older than its CUDA
        warnings.warn(TOO_OLD, UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", too_old)
    f = gather_device_facts()
    assert f.driver == version and f.device_files == ("nvidia-uvm", "nvidia0", "nvidiactl")
    assert (f.nvidia_visible_devices, f.cuda_visible_devices, f.device_count) == ("all", None, 0)
    assert f.torch_cuda == torch.version.cuda and f.reason == TOO_OLD


def test_facts_without_any_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(dist_mod, "DRIVER_VERSION_FILE", str(tmp_path / "missing"))
    monkeypatch.setattr(dist_mod, "DEVICE_FILES", str(tmp_path / "nvidia*"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    f = gather_device_facts()
    assert (f.driver, f.device_files, f.device_count, f.reason) == (None, (), 0, None)


# --- choosing the device --------------------------------------------------------------------------


@pytest.fixture
def no_gpu(tmp_path, monkeypatch):
    """This process sees no GPU, whatever the machine; env changes are undone after the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_mod, "DEVICE_FILES", str(tmp_path / "nvidia*"))
    for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "DS_ACCELERATOR"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_cpu_hides_the_gpus_from_the_rank(no_gpu):
    assert select_device("cpu", "auto", 0) == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize("device, backend, asked", [("cuda", "auto", "train.device=cuda"), ("auto", "nccl", "train.backend=nccl")])
def test_cuda_asked_for_and_unusable_raises_one_line(no_gpu, device, backend, asked):
    with pytest.raises(DeviceUnavailable) as e:
        select_device(device, backend, 0)
    assert str(e.value).startswith(f"{asked} but CUDA is unusable on local rank 0: ") and "\n" not in str(e.value)
    assert isinstance(e.value, RuntimeError)  # m3i's CLI maps RuntimeError to exit 1 with its one line


def test_cuda_takes_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # left over from a CPU run: CUDA wins
    assert select_device("cuda", "auto", 1) == torch.device("cuda", 1)
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    with pytest.raises(DeviceUnavailable, match="torch sees 2 GPUs.*local rank 2 has no GPU of its own"):
        select_device("cuda", "auto", 2)


def test_auto_falls_back_to_the_cpu_and_says_so_when_gpus_seem_present(no_gpu, caplog):
    assert select_device("auto", "auto", 0) == torch.device("cpu")
    assert not [r for r in caplog.records if "GPUs seem present" in r.getMessage()]  # none here: nothing to say
    (no_gpu / "nvidia0").touch()
    with caplog.at_level("WARNING", logger="m3i.train.dist"):
        assert select_device("auto", "auto", 0) == torch.device("cpu")
    (rec,) = [r for r in caplog.records if "GPUs seem present" in r.getMessage()]
    assert "/dev/nvidia* present (nvidia0)" in rec.getMessage()


def test_train_device_config():
    assert load_config(None, None, []).train.device == "auto"
    assert load_config(None, None, ["train.device=cpu", "train.backend=gloo"]).train.device == "cpu"
    with pytest.raises(ValueError, match=r"train.device='gpu' is not allowed; choose one of \['auto', 'cuda', 'cpu'\]"):
        load_config(None, None, ["train.device=gpu"])
    with pytest.raises(ValueError, match="train.backend='nccl' needs CUDA but train.device='cpu'"):
        load_config(None, None, ["train.device=cpu", "train.backend=nccl"])


def test_init_distributed_on_the_cpu_uses_gloo(no_gpu, monkeypatch):
    import torch.distributed as dist

    from tests.helpers import one_rank_here

    one_rank_here(monkeypatch)
    with pytest.raises(DeviceUnavailable):
        dist_mod.init_distributed(device="cuda")
    assert not dist.is_initialized()  # refused before joining any group
    info = dist_mod.init_distributed(device="cpu")
    try:
        assert info.device == torch.device("cpu") and dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


def test_m3i_train_asked_for_gpus_that_are_not_there_exits_1_before_training(tmp_path):
    """GPUs requested (train.device=cuda, as m3i launch sets it) and CUDA_VISIBLE_DEVICES pointing at nothing."""
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "m3i", "train", "--preset", "demo", "--set", f"train.output={out}",
         "--set", f"data.shards={tmp_path / 'no-shards'}", "--set", "train.device=cuda"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("m3i train: failed: train.device=cuda but CUDA is unusable on local rank 0: "), line
    for needle in ("CUDA_VISIBLE_DEVICES='' (no GPU)", "/dev/nvidia*", "driver ", f"built for CUDA {torch.version.cuda}"):
        assert needle in line, (needle, line)
    assert not out.exists()  # nothing trained, nothing written
