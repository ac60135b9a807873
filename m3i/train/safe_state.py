"""Checkpoint files that cannot run code when read: JSON + safetensors, and weights-only torch pickles.

A checkpoint lives in a bucket that more people and jobs can write than should run code in
the trainer. ``torch.load(weights_only=False)`` unpickles whatever a file says, including a
``__reduce__`` that runs a command, so nothing here reads a pickle that way:

* Our own state (per-rank RNG streams and loader position, the world-size-independent
  optimizer copy) is a safetensors file whose header metadata holds the non-tensor part as
  JSON (:func:`save_state` / :func:`load_state`). Neither format can describe code.
* DeepSpeed's own files are torch pickles that DeepSpeed reads itself; :func:`use_weights_only`
  gives an engine a checkpoint engine that reads them with ``weights_only=True`` and allows
  only the few DeepSpeed classes those files really contain (:func:`deepspeed_globals`).
* :func:`check_pickle` refuses such a file from its opcodes alone, before anything is loaded.

The refusal is :class:`m3i.artifacts.UnsafeCheckpointError`, the same wherever a checkpoint is
read (resume here; ``train.init_from``, export and evaluate through :mod:`m3i.artifacts.zero`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3i.artifacts.errors import UnsafeCheckpointError
from m3i.artifacts.zero import load_weights_only

__all__ = [
    "check_pickle",
    "deepspeed_globals",
    "load_legacy_rank_state",
    "load_state",
    "numpy_globals",
    "save_state",
    "use_weights_only",
]

_META_KEY = "m3i_state"


def deepspeed_globals() -> list[Any]:
    """The DeepSpeed classes a DeepSpeed checkpoint file may hold (imports DeepSpeed)."""
    # The only non-tensor globals in DeepSpeed 0.19 checkpoints of ZeRO-0..3 in fp32/bf16/fp16
    # (found with torch.serialization.get_unsafe_globals_in_checkpoint on each case). Each is
    # plain data: a dataclass of two ints, an int enum, and loss-scaler records of numbers.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_weights_only(engine) -> None:
    """Make ``engine`` read its checkpoint files with ``weights_only=True`` (DeepSpeed's own loader does not).

    Raises:
        RuntimeError: When the engine uses a checkpoint engine other than DeepSpeed's torch one
            (a config this code does not make), whose loading could not be checked.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    safe = _weights_only_engine_class()
    if isinstance(current, safe):
        return
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed uses checkpoint engine {type(current).__name__}; m3i reads checkpoints only through TorchCheckpointEngine")
    replacement = safe.__new__(safe)
    replacement.__dict__.update(current.__dict__)  # same serialization settings, no second init log
    engine.checkpoint_engine = replacement


@functools.lru_cache(maxsize=None)
def _weights_only_engine_class() -> type:
    # Defined on first use: importing DeepSpeed costs seconds, and export reads checkpoints without it.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine whose load cannot run pickled code."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, map_location, deepspeed_globals())

    return WeightsOnlyCheckpointEngine


# -- our own state: JSON + safetensors -------------------------------------------------------


def _pack(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        # Raw bytes: safetensors has no uint32, numpy's RNG key is one.
        key = f"t{len(tensors)}"
        arr = np.ascontiguousarray(obj)
        tensors[key] = torch.frombuffer(bytearray(arr.tobytes()), dtype=torch.uint8) if arr.nbytes else torch.empty(0, dtype=torch.uint8)
        return {"__ndarray__": key, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{where}: dict keys must be strings to be saved, got {sorted(map(repr, obj))[:3]}")
        if any(k.startswith("__") and k.endswith("__") for k in obj):
            raise TypeError(f"{where}: dict keys like {sorted(obj)[0]!r} are reserved")
        return {k: _pack(v, tensors, f"{where}.{k}") for k, v in obj.items()}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved as JSON + tensors")


def _unpack(doc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(doc, list):
        return [_unpack(v, tensors) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if "__tensor__" in doc:
        return tensors[doc["__tensor__"]]
    if "__ndarray__" in doc:
        raw = tensors[doc["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(doc["dtype"])).reshape(doc["shape"]).copy()
    if "__tuple__" in doc:
        return tuple(_unpack(v, tensors) for v in doc["__tuple__"])
    return {k: _unpack(v, tensors) for k, v in doc.items()}


def save_state(state: Any, path: str | Path) -> None:
    """Write ``state`` (plain data, tuples, tensors, numpy arrays) as one safetensors file.

    Raises:
        TypeError: On a value that has no JSON + tensor form (an arbitrary object).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = _pack(state, tensors, "state")
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(doc)})


def load_state(path: str | Path) -> Any:
    """Read a file :func:`save_state` wrote.

    Raises:
        UnsafeCheckpointError: When the file is not such a safetensors file (whatever else it holds
            is never interpreted).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(meta[_META_KEY])
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same refusal
        raise UnsafeCheckpointError(f"{path}: not an m3i state file (safetensors with JSON metadata): {type(e).__name__}: {e}") from None
    return _unpack(doc, tensors)


def load_legacy_rank_state(path: str | Path) -> Any:
    """A ``rank-XXXXX.pt`` of checkpoints written before :func:`save_state`, read weights-only.

    Allows the numpy globals of ``np.random.get_state()`` and nothing else.

    Raises:
        UnsafeCheckpointError: When it holds anything else.
    """
    return load_weights_only(path, "cpu", numpy_globals())


def check_pickle(path: str | Path, extra_globals: list[Any] | None = None) -> None:
    """Refuse a torch pickle that names any global beyond torch's allow-list and ``extra_globals``, without loading it.

    Reads only the pickle's opcodes (not its tensors), so a node can check every file of a
    checkpoint before any rank loads one: all ranks then refuse together instead of one rank
    failing inside a collective load while the others wait.

    Raises:
        UnsafeCheckpointError: Naming the file and the globals it would import.
    """
    try:
        with torch.serialization.safe_globals(extra_globals or []):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - not a torch zip file: nothing we can vouch for
        raise UnsafeCheckpointError(f"{path}: not a torch checkpoint that can be checked before loading ({type(e).__name__}: {e})") from None
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path}: refused: its pickle imports {sorted(unsafe)[:5]}, beyond tensors, plain data and the allowed "
            "DeepSpeed classes; a file that could run code when read is never loaded. If this m3i and DeepSpeed did "
            "not write it, someone else did: check who can write the checkpoint bucket"
        )


def numpy_globals() -> list[Any]:
    """What ``np.random.get_state()`` pickles to, for rank files of checkpoints written before :func:`save_state`."""
    found = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        found.append(np._core.multiarray._reconstruct)  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        found.append(np.core.multiarray._reconstruct)
    return found
