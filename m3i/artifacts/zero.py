"""One backbone's full float32 tensors out of a DeepSpeed checkpoint of any ZeRO stage and world size.

Where the float32 values live (DeepSpeed 0.19.8, checked on checkpoints of every case):

==================  ===========================================  ==========================================
run                 online encoder ``backbone.*``                EMA target ``target.backbone.*``
==================  ===========================================  ==========================================
ZeRO-0/1/2, fp32    module state, ``mp_rank_00_model_states.pt``  module state (same file)
ZeRO-0, bf16/fp16   optimizer ``fp32_groups`` in that file: one   ``ema.master`` of the client state
                    tensor per parameter, in optimizer-group order
ZeRO-1/2, bf16/fp16 fp32 partitions in each rank's                ``ema.master`` of the client state
                    ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_
                    states.pt``, found by ``param_slice_mappings``
ZeRO-3, fp32        ``fp32_flat_groups`` of the optimizer shards:  ``frozen_param_fragments`` of each rank's
                    each parameter cut in ``ceil(n / world)``     ``zero_pp_rank_R_mp_rank_00_model_states.pt``
                    padded pieces, one per rank
ZeRO-3, bf16/fp16   same                                          ``ema.master`` of each rank's client state
                                                                  (that rank's padded piece)
==================  ===========================================  ==========================================

Every file is opened with ``torch.load(mmap=True, weights_only=True)``: only the pages of
the tensors actually read come into memory, so the optimizer moments and the other
modules never do. DeepSpeed's own ``zero_to_fp32`` loads model-state files whole and
concatenates whole ZeRO-1/2 partitions; this reader does neither and needs no DeepSpeed import.

A file that holds more than tensors and plain data (a planted pickle) is refused with
:class:`m3i.artifacts.UnsafeCheckpointError` before anything of it runs; one that does not read
as a torch file at all with :class:`m3i.artifacts.DamagedArtifactError`. Both name the file.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from m3i.artifacts.errors import UnsafeCheckpointError, damaged, first_line

__all__ = ["MODEL_STATES", "BackboneReader", "load_state", "load_weights_only"]

log = logging.getLogger(__name__)

MODEL_STATES = "ds/mp_rank_00_model_states.pt"
_Z3_MODEL = re.compile(r"^ds/zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_OPTIM = re.compile(r"^ds/(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_OTHER_MP = re.compile(r"^ds/.*mp_rank_(?!00)\d+")


class _Record:
    """Stands in for DeepSpeed's small pickled objects (loss scaler, fragment address): keeps their fields."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def _enum_value(value: Any) -> Any:
    return value


# The only non-tensor globals in DeepSpeed 0.19 checkpoints; allowed under their own names so that
# weights_only loading works without importing DeepSpeed (and never runs arbitrary pickled code).
_SAFE_GLOBALS = [
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def _refused(e: pickle.UnpicklingError) -> str:
    """What torch refused, from its message (whose first line suggests loading the file unchecked: left out)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return named[0] if named else type(e).__name__


def load_weights_only(path: str | Path, map_location: Any = None, extra_globals: list[Any] | None = None, *, mmap: bool = False) -> Any:
    """``torch.load`` that allows only tensors, plain containers and ``extra_globals``.

    Raises:
        UnsafeCheckpointError: When the file holds anything else (the message names the file
            and what torch refused).
    """
    try:
        with torch.serialization.safe_globals(extra_globals or []):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle it: it holds more than tensors and plain data ({_refused(e)}); a file that "
            "runs code when read is never loaded. If this file was not written by this m3i and DeepSpeed, it "
            "was put there by someone else: check who can write the checkpoint bucket"
        ) from None


def load_state(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of a DeepSpeed checkpoint file, memory-mapped and weights-only.

    Raises:
        UnsafeCheckpointError: When the file holds more than tensors and plain data.
        DamagedArtifactError: When it does not read as a torch file (truncated, or not one).
    """
    try:
        try:
            return load_weights_only(path, "cpu", _SAFE_GLOBALS, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            log.warning("%s is not in the zip format that mmap needs; loading it whole", path)
            return load_weights_only(path, "cpu", _SAFE_GLOBALS)
    except (RuntimeError, EOFError) as e:  # torch's reader reports a cut or foreign file as RuntimeError
        raise damaged("checkpoint file", str(path), f"it does not read as a torch file ({first_line(e)})") from None


def _ranked(keys: list[str], pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    """``(rank, key)`` of the keys that match ``pattern`` (rank in its first group), by rank."""
    out = []
    for k in keys:
        m = pattern.match(k)
        if m:
            out.append((int(m.group(1)), k))
    return sorted(out)


def _span(flats: list[torch.Tensor], cum: list[int], start: int, length: int) -> list[torch.Tensor]:
    """Elements ``[start, start + length)`` of the concatenation of ``flats`` (``cum``: their start offsets)."""
    pieces, end = [], start + length
    for t, lo in zip(flats, cum):
        hi = lo + t.numel()
        if hi <= start or lo >= end:
            continue
        a, b = max(start, lo), min(end, hi)
        pieces.append(t.narrow(0, a - lo, b - a))
    if sum(p.numel() for p in pieces) != length:
        raise ValueError(f"a ZeRO-3 partition ends before element {end}; the checkpoint's shards do not match its layout")
    return pieces


def _join(pieces: list[torch.Tensor], numel: int, shape: torch.Size) -> torch.Tensor:
    """The first ``numel`` elements of the pieces, shaped; a view (no copy) when one piece holds them all."""
    flat = pieces[0] if len(pieces) == 1 else torch.cat([p.reshape(-1) for p in pieces])
    if flat.numel() < numel:
        raise ValueError(f"a parameter of shape {tuple(shape)} has only {flat.numel()} of its {numel} elements in the checkpoint")
    return flat.reshape(-1).narrow(0, 0, numel).view(shape)


class BackboneReader:
    """Yields the backbone's tensors in float32, full and in the order asked, from a local checkpoint.

    Args:
        keys: The checkpoint's file keys (``complete.json``'s list).
        path: Maps a file key to a local path (downloading it on first use).
        prefix: ``backbone.`` (online encoder) or ``target.backbone.`` (EMA target).
        params: Names of the backbone's parameters in module order (what ``named_parameters`` gives);
            the EMA master list follows this order.
        group_names: For ZeRO-0 mixed-precision runs only: a callable returning the parameter names
            of each optimizer group, in order (see :func:`m3i.models.optimizer_group_names`).

    Raises:
        ValueError: On a layout this reader does not know (model parallelism, a missing rank file).
    """

    def __init__(
        self,
        keys: list[str],
        path: Callable[[str], Path],
        prefix: str,
        params: list[str],
        group_names: Callable[[], list[list[str]]] | None = None,
    ) -> None:
        self.prefix, self.params, self._path, self._group_names = prefix, params, path, group_names
        if any(_OTHER_MP.match(k) for k in keys):
            raise ValueError("the checkpoint has model-parallel ranks (mp_rank_01...); export reads data-parallel checkpoints only")
        z3 = _ranked(keys, _Z3_MODEL)
        self.optim_keys = [k for _, k in _ranked(keys, _OPTIM)]
        self.zero3 = bool(z3)
        if self.zero3:
            if [r for r, _ in z3] != list(range(len(z3))):
                raise ValueError(f"ZeRO-3 checkpoint is missing model-state files of some ranks: has ranks {[r for r, _ in z3]}")
            self.model_keys = [k for _, k in z3]
        elif MODEL_STATES in keys:
            self.model_keys = [MODEL_STATES]
        else:
            raise ValueError(f"no DeepSpeed model states in the checkpoint (expected {MODEL_STATES} or ds/zero_pp_rank_*_model_states.pt)")
        self.states = [load_state(self._path(self.model_keys[0]))]
        main = self.states[0]
        self.module: dict[str, torch.Tensor] = main["module"]
        ema = main.get("ema") or {}
        self.ema_master = ema.get("master")
        self.source = self._choose()

    # ------------------------------------------------------------------ which source

    def _module_is_fp32(self) -> bool:
        return not self.zero3 and all(self.module[self.prefix + n].dtype == torch.float32 for n in self.params)

    def _choose(self) -> str:
        missing = [n for n in self.params if self.prefix + n not in self.module]
        if missing:
            raise ValueError(f"the checkpoint's module has no {self.prefix}{missing[0]} ({len(missing)} of {len(self.params)} tensors missing)")
        if self._module_is_fp32():
            return "module"
        if self.prefix == "target.backbone.":
            if self.ema_master is not None:
                return "ema_master"
            if self.zero3:
                return "frozen_fragments"
            raise ValueError(f"no float32 copy of {self.prefix}* in the checkpoint (no EMA master, module not float32)")
        if self.zero3:
            return "zero3_optimizer"
        if self.optim_keys:
            return "zero12_optimizer"
        opt = self.states[0].get("optimizer") or {}
        if "fp32_groups" in opt:
            return "zero0_fp32_groups"
        raise ValueError(f"no float32 master weights of {self.prefix}* in the checkpoint (ZeRO-0 optimizer keys {sorted(opt)})")

    def describe(self) -> str:
        """Where the float32 values come from, in words (goes into the model card)."""
        return {
            "module": "module state (float32)",
            "ema_master": "float32 EMA master copy (client state)",
            "frozen_fragments": "ZeRO-3 partitions of the frozen EMA target (model states of every rank)",
            "zero3_optimizer": "float32 master partitions of the ZeRO-3 optimizer shards",
            "zero12_optimizer": "float32 master partitions of the ZeRO-1/2 optimizer shards",
            "zero0_fp32_groups": "float32 master copies of the optimizer (ZeRO-0 mixed precision)",
        }[self.source]

    # ------------------------------------------------------------------ reading

    def _all_model_states(self) -> list[dict[str, Any]]:
        while len(self.states) < len(self.model_keys):
            self.states.append(load_state(self._path(self.model_keys[len(self.states)])))
        return self.states

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every backbone tensor (metadata only, nothing read)."""
        if not self.zero3:
            return {n: tuple(self.module[self.prefix + n].shape) for n in self.params}
        main = self.states[0]
        known: dict[str, Any] = {}
        for group in main.get("param_shapes") or []:
            known.update(group)
        known.update(main.get("frozen_param_shapes") or {})
        out = {}
        for n in self.params:
            if self.prefix + n not in known:
                raise ValueError(f"the ZeRO-3 checkpoint records no shape for {self.prefix}{n}")
            out[n] = tuple(known[self.prefix + n])
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name without prefix, float32 tensor)`` for each parameter, in ``params`` order."""
        shapes = self.shapes()
        read = getattr(self, f"_read_{self.source}")
        for name, t in read(shapes):
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{self.prefix}{name}: read shape {tuple(t.shape)}, recorded {shapes[name]}")
            yield name, t.float()

    def _read_module(self, shapes):
        for n in self.params:
            yield n, self.module[self.prefix + n]

    def _read_ema_master(self, shapes):
        masters = [s["ema"]["master"] for s in self._all_model_states()]
        if any(len(m) < len(self.params) for m in masters):
            raise ValueError(f"the EMA master list has {len(masters[0])} tensors, fewer than the backbone's {len(self.params)}")
        for i, n in enumerate(self.params):
            shape = torch.Size(shapes[n])
            yield n, _join([m[i] for m in masters], shape.numel(), shape)

    def _read_frozen_fragments(self, shapes):
        states = self._all_model_states()
        for n in self.params:
            shape = torch.Size(shapes[n])
            yield n, _join([s["frozen_param_fragments"][self.prefix + n] for s in states], shape.numel(), shape)

    def _optim_states(self) -> list[dict[str, Any]]:
        out = [load_state(self._path(k))["optimizer_state_dict"] for k in self.optim_keys]
        count = out[0].get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count is not None and count != len(out):
            raise ValueError(f"the optimizer was partitioned over {count} ranks but the checkpoint has {len(out)} optimizer shards")
        return out

    def _read_zero12_optimizer(self, shapes):
        opts = self._optim_states()
        where: dict[str, list[tuple[int, int, int, int]]] = {}
        for r, opt in enumerate(opts):
            for g, mapping in enumerate(opt["param_slice_mappings"]):
                for name, frag in mapping.items():
                    where.setdefault(name, []).append((r, g, int(frag.start), int(frag.numel)))
        for n in self.params:
            shape = torch.Size(shapes[n])
            frags = sorted(where.get(self.prefix + n, []))  # rank order = element order
            pieces = [opts[r]["single_partition_of_fp32_groups"][g].narrow(0, start, numel) for r, g, start, numel in frags]
            if sum(p.numel() for p in pieces) != shape.numel():
                raise ValueError(f"{self.prefix}{n}: the optimizer shards hold {sum(p.numel() for p in pieces)} of its {shape.numel()} elements")
            yield n, _join(pieces, shape.numel(), shape)

    def _read_zero3_optimizer(self, shapes):
        opts = self._optim_states()
        world = len(opts)
        flats = [opt["fp32_flat_groups"] for opt in opts]
        cum = [0]
        for t in flats[0][:-1]:
            cum.append(cum[-1] + t.numel())
        offsets, offset = {}, 0
        for group in self.states[0]["param_shapes"]:
            for name, shape in group.items():
                offsets[name] = offset
                offset += math.ceil(math.prod(shape) / world)
        if offset != sum(t.numel() for t in flats[0]):
            raise ValueError(f"ZeRO-3 layout mismatch: the parameters need {offset} elements per rank, the shards hold {sum(t.numel() for t in flats[0])}")
        for n in self.params:
            shape = torch.Size(shapes[n])
            part = math.ceil(shape.numel() / world)
            pieces = [p for r in range(world) for p in _span(flats[r], cum, offsets[self.prefix + n], part)]
            yield n, _join(pieces, shape.numel(), shape)

    def _read_zero0_fp32_groups(self, shapes):
        if self._group_names is None:
            raise ValueError("a ZeRO-0 mixed-precision checkpoint needs the optimizer's parameter order (group_names)")
        groups = self.states[0]["optimizer"]["fp32_groups"]
        names = self._group_names()
        if [len(g) for g in names] != [len(g) for g in groups]:
            raise ValueError(f"optimizer groups of {[len(g) for g in groups]} tensors, the model gives {[len(g) for g in names]}")
        where = {name: groups[g][i] for g, group in enumerate(names) for i, name in enumerate(group)}
        for n in self.params:
            if self.prefix + n not in where:
                raise ValueError(f"{self.prefix}{n} is not in any optimizer group of the checkpoint")
            yield n, where[self.prefix + n]
