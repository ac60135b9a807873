"""torch.distributed under torchrun's environment: one process per GPU (or CPU slot).

The device is chosen before anything else starts (:func:`select_device`, ``train.device``): a
rank told to use CUDA that cannot stops with one line saying what it sees (visible devices,
``/dev/nvidia*``, driver, torch's CUDA) instead of training on the CPU; a rank told to use the
CPU hides the GPUs, so a GPU node never gets NCCL with the model on the CPU.
"""

from __future__ import annotations

import datetime
import glob
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "DeviceFacts",
    "DeviceUnavailable",
    "DistInfo",
    "all_ok",
    "barrier",
    "broadcast_object",
    "cuda_unusable_message",
    "gather_device_facts",
    "init_distributed",
    "select_device",
]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"
DEVICE_FILES = "/dev/nvidia*"
_HIDDEN = ("", "-1", "none", "void", "NoDevFiles")  # CUDA_ / NVIDIA_VISIBLE_DEVICES values that show no GPU
_DRIVER = re.compile(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s")


class DeviceUnavailable(RuntimeError):
    """The rank was told to train on CUDA and cannot; the message is one line naming what it sees."""


@dataclass(frozen=True)
class DeviceFacts:
    """What a rank can tell about its GPUs without using one (see :func:`gather_device_facts`)."""

    cuda_visible_devices: str | None
    """``CUDA_VISIBLE_DEVICES`` (``None``: unset, every GPU the container has)."""
    nvidia_visible_devices: str | None
    """``NVIDIA_VISIBLE_DEVICES``: what the NVIDIA container runtime or device plugin mounted (``None``: unset)."""
    device_files: tuple[str, ...]
    """``/dev/nvidia*`` present in this container, e.g. ``("nvidia0", "nvidiactl")``."""
    driver: str | None
    """Kernel driver version from ``/proc/driver/nvidia/version``, ``None`` when unreadable."""
    torch_version: str
    """``torch.__version__``."""
    torch_cuda: str | None
    """``torch.version.cuda``: the CUDA this torch was built for (``None``: a CPU-only build)."""
    device_count: int
    """GPUs torch can use."""
    reason: str | None = None
    """torch's own word on why CUDA failed (its initialisation warning), first line; ``None`` if it gave none."""


def gather_device_facts() -> DeviceFacts:
    """Read :class:`DeviceFacts` of this process: environment, ``/dev``, ``/proc`` and torch.

    Asks torch for the device count, which initialises CUDA's driver API (not a context).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            error = None
        except Exception as e:  # a broken driver may raise instead of warning
            count, error = 0, f"{type(e).__name__}: {e}"
    said = [str(w.message) for w in caught if "cuda" in str(w.message).lower()]
    reason = error or (said[0] if said else None)
    try:
        m = _DRIVER.search(Path(DRIVER_VERSION_FILE).read_text(errors="replace"))
        driver = m.group(1) if m else None
    except OSError:
        driver = None
    return DeviceFacts(
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        nvidia_visible_devices=os.environ.get("NVIDIA_VISIBLE_DEVICES"),
        device_files=tuple(sorted(os.path.basename(p) for p in glob.glob(DEVICE_FILES))),
        driver=driver,
        torch_version=str(torch.__version__),
        torch_cuda=torch.version.cuda,
        device_count=count,
        reason=" ".join(reason.split()) if reason else None,
    )


def _env_fact(name: str, value: str | None) -> str:
    if value is None:
        return f"{name} unset"
    return f"{name}={value!r}" + (" (no GPU)" if value.strip() in _HIDDEN else "")


def describe_devices(facts: DeviceFacts) -> str:
    """One line of what the rank sees: visible devices, device files, driver, torch's CUDA and device count."""
    files = facts.device_files
    shown = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
    parts = [
        _env_fact("CUDA_VISIBLE_DEVICES", facts.cuda_visible_devices),
        _env_fact("NVIDIA_VISIBLE_DEVICES", facts.nvidia_visible_devices),
        f"/dev/nvidia* present ({shown})" if files else "/dev/nvidia* absent",
        f"driver {facts.driver}" if facts.driver else f"driver unknown (no readable {DRIVER_VERSION_FILE})",
        f"torch {facts.torch_version} built for CUDA {facts.torch_cuda}" if facts.torch_cuda
        else f"torch {facts.torch_version} built without CUDA",
        f"torch sees {facts.device_count} GPU{'s' if facts.device_count != 1 else ''}",
    ]
    text = ", ".join(parts)
    if facts.reason:
        text += f"; torch says: {facts.reason[:300]}"
    return text


def _hint(facts: DeviceFacts, local_rank: int) -> str:
    """What most likely went wrong, from the facts alone."""
    if facts.device_count and local_rank >= facts.device_count:
        return f"local rank {local_rank} has no GPU of its own: run at most one rank per visible GPU"
    if facts.cuda_visible_devices is not None and facts.cuda_visible_devices.strip() in _HIDDEN:
        return "CUDA_VISIBLE_DEVICES hides every GPU from this process"
    if not facts.torch_cuda:
        return "this torch build has no CUDA: install a CUDA build of torch"
    if not facts.device_files:
        return ("no GPU reached this container: request nvidia.com/gpu (launch.gpus_per_node) on a node with the "
                "NVIDIA device plugin, and the nvidia RuntimeClass where the cluster needs one")
    if facts.driver is None:
        return "GPU device files but no NVIDIA kernel driver is loaded on the node"
    return (f"the node's driver {facts.driver} may be older than CUDA {facts.torch_cuda} needs: use GPU nodes "
            "with a newer driver, or an image built for an older CUDA")


def cuda_unusable_message(facts: DeviceFacts, local_rank: int = 0, asked_by: str = "train.device=cuda") -> str:
    """The one line a rank that must use CUDA and cannot exits with (no newline in it).

    Args:
        facts: What the rank sees (:func:`gather_device_facts`).
        local_rank: The rank on its node, i.e. the GPU it would take.
        asked_by: The setting that asked for CUDA.
    """
    return f"{asked_by} but CUDA is unusable on local rank {local_rank}: {describe_devices(facts)} -- {_hint(facts, local_rank)}"


def _gpus_hinted(facts: DeviceFacts) -> bool:
    """GPUs seem to be there (device files, or the runtime mounted some) and nobody hid them on purpose."""
    hidden = facts.cuda_visible_devices is not None and facts.cuda_visible_devices.strip() in _HIDDEN
    mounted = facts.nvidia_visible_devices is not None and facts.nvidia_visible_devices.strip() not in _HIDDEN
    return not hidden and (bool(facts.device_files) or mounted)


def select_device(device: str = "auto", backend: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device this rank trains on, checked before anything uses it.

    Args:
        device: ``cuda`` (must work), ``cpu`` (GPUs hidden from this process) or ``auto``.
        backend: ``train.backend``; ``nccl`` with ``auto`` asks for CUDA as ``cuda`` does, ``gloo``
            with ``auto`` means the CPU.
        local_rank: The GPU to take; ``LOCAL_RANK`` (or 0) by default.

    Returns:
        ``cuda:<local_rank>`` or ``cpu``.

    Raises:
        DeviceUnavailable: CUDA is asked for and unusable (one line: :func:`cuda_unusable_message`).
        ValueError: ``device`` is not one of ``auto``, ``cuda``, ``cpu``.
    """
    if device not in DEVICES:
        raise ValueError(f"train.device={device!r} is not allowed; choose one of {list(DEVICES)}")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cpu":
        # Hide the GPUs from CUDA (read when it initialises) and from DeepSpeed's accelerator probe,
        # so that nothing in this rank or its loader workers picks them up.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
        return torch.device("cpu")
    if device == "auto" and backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return torch.device("cpu")
    facts = gather_device_facts()
    if facts.device_count > local_rank:
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            log.warning("DS_ACCELERATOR=cpu ignored: this rank trains on CUDA (train.device=%s)", device)
            os.environ["DS_ACCELERATOR"] = "cuda"
        return torch.device("cuda", local_rank)
    if device == "cuda" or backend == "nccl":
        asked = "train.device=cuda" if device == "cuda" else "train.backend=nccl"
        raise DeviceUnavailable(cuda_unusable_message(facts, local_rank, asked))
    if _gpus_hinted(facts):
        log.warning("training on the CPU although GPUs seem present (train.device=auto): %s -- %s",
                    describe_devices(facts), _hint(facts, local_rank))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", timeout_s: int = 1800, device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ...); plain single process otherwise.

    Args:
        backend: ``auto`` (NCCL on CUDA, else gloo), ``nccl`` or ``gloo``.
        timeout_s: Collective timeout; a dead peer turns into an error after it, not a hang forever.
        device: ``train.device``: ``auto``, ``cuda`` or ``cpu`` (see :func:`select_device`).

    Raises:
        DeviceUnavailable: CUDA is asked for (``device='cuda'`` or ``backend='nccl'``) and unusable.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    node_rank = int(os.environ.get("GROUP_RANK", str(rank // max(1, local_world))))
    dev = select_device(device, backend, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if "MASTER_ADDR" not in os.environ:  # a plain `m3i train` without torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, local_world, node_rank, dev)


def _free_port() -> int:
    """A free port on 127.0.0.1, so two single-process runs on one machine do not clash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank."""
    if not dist.is_initialized():
        return ok
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src``, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
