"""A checkpoint's training state in a form no world size is baked into, for a resume on another number of ranks.

DeepSpeed's ZeRO-1/2/3 files hold each rank's flat partition of the float32 master weights and
Adam moments, and this DeepSpeed refuses to load them on another data-parallel size. So each
save of a ZeRO-1/2/3 run also writes, beside ``ds/``:

    full/state.safetensors   for every trainable parameter ``<name>``, full shape, float32:
                             ``master/<name>``, ``exp_avg/<name>``, ``exp_avg_sq/<name>``;
                             under ZeRO-3, which partitions the rest too, also ``frozen/<name>``
                             (parameters outside the optimizer, e.g. the EMA target),
                             ``buffer/<name>`` and ``ema/<i>`` (the EMA target's float32 master)
    (its JSON metadata)      Adam's step count, the parameter names, each optimizer group's
                             hyperparameters, the LR schedule, DeepSpeed's step counters, the
                             fp16 loss scale and the client state

written by rank 0 from DeepSpeed's tensor-fragment API (``deepspeed.utils.safe_get_full_*``,
collectives every rank joins), so rank 0 holds the whole copy in host memory while it writes
(16 bytes per trainable parameter). A resume on another world size cuts the new partitions
from it: ``safe_set_full_*`` under ZeRO-1/2, this module's own cut under ZeRO-3 (DeepSpeed's
fails where the world size does not divide a parameter). ZeRO-0 needs none of this: its
optimizer file is already whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from m3i.train.safe_state import load_state, save_state

__all__ = ["FILE", "applies", "load_full_state", "save_full_state"]

FILE = "full/state.safetensors"
"""Key of the world-size-independent state inside a checkpoint folder."""

_MOMENTS = ("exp_avg", "exp_avg_sq")
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def applies(engine) -> bool:
    """Whether ``engine``'s optimizer state is cut per rank (ZeRO-1/2/3), so a full copy is needed."""
    return engine.zero_optimization_stage() in (1, 2, 3)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _flat_masters(engine) -> list[torch.Tensor]:
    """The flat float32 partitions the base optimizer steps: its state is keyed by them."""
    opt = engine.optimizer
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) if engine.zero_optimization_stage() == 3 else getattr(opt, "single_partition_of_fp32_groups", None)
    if flats is None:
        raise RuntimeError(f"{type(opt).__name__} has no flat float32 partitions where this DeepSpeed version keeps them")
    return list(flats)


def _ema_targets(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    # The order of m3i.train.ema.EMAUpdater's master list.
    return [*module.target.backbone.parameters(), *module.target.projector.parameters()]


def _group_hyperparameters(engine) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params" and isinstance(v, (bool, int, float, str, tuple, type(None)))} for g in engine.optimizer.param_groups]


# -- save ------------------------------------------------------------------------------------


def save_full_state(engine, path: Path, client_state: dict[str, Any], is_main: bool) -> None:
    """Write the world-size-independent state of ``engine`` to ``path`` (on rank 0). Collective.

    Args:
        engine: A ZeRO-1/2/3 DeepSpeed engine after at least one optimizer step.
        path: Where rank 0 writes (``<staging>/<tag>/full/state.safetensors``).
        client_state: What the checkpoint's client state holds (``step``, ``loader``, ``ema``, ``meta``).
        is_main: Whether this is rank 0.

    Raises:
        RuntimeError: When DeepSpeed does not give a parameter's full state (an optimizer without
            Adam moments, a DeepSpeed whose tensor-fragment API changed).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    stage = engine.zero_optimization_stage()
    tensors: dict[str, torch.Tensor] = {}

    def keep(key: str, t: torch.Tensor | None, name: str) -> None:
        if t is None:
            raise RuntimeError(f"DeepSpeed gave no full {key.split('/')[0]} of {name} (ZeRO-{stage}); the optimizer state cannot be saved whole")
        if is_main:
            tensors[key] = t.detach().float().cpu().clone()

    base = engine.optimizer.optimizer
    if not all(base.state.get(flat) for flat in _flat_masters(engine)):
        # No optimizer step yet (an fp16 overflow skipped the first): Adam's state is what it will start from.
        _init_adam_state(engine, max([float(s["step"]) for s in base.state.values() if "step" in s], default=0.0))
    _link_moments(engine)
    names = []
    for name, p in _trainable(engine):
        names.append(name)
        keep(f"master/{name}", safe_get_full_fp32_param(p), name)
        for m in _MOMENTS:
            keep(f"{m}/{name}", safe_get_full_optimizer_state(p, m), name)
    if stage == 3:
        _gather_zero3_rest(engine, client_state, tensors, is_main)

    steps = {float(base.state[flat]["step"]) for flat in _flat_masters(engine)}
    if len(steps) != 1:
        raise RuntimeError(f"the optimizer's partitions disagree on Adam's step count ({sorted(steps)}); expected one value")
    if not is_main:
        return
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    meta = {
        "format": 1,
        "zero_stage": stage,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "adam_step": steps.pop(),
        "params": names,
        "param_groups": _group_hyperparameters(engine),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps},
        "loss_scaler": {f: getattr(scaler, f) for f in _SCALER_FIELDS if isinstance(getattr(scaler, f, None), (int, float))},
        "client": {k: v for k, v in client_state.items() if k != "ema"},
        "tensors": tensors,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(meta, path)


def _gather_zero3_rest(engine, client_state: dict[str, Any], tensors: dict[str, torch.Tensor], is_main: bool) -> None:
    """Full frozen parameters, buffers and EMA master of a ZeRO-3 engine (ZeRO-3 partitions them too)."""
    import deepspeed

    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                if is_main:
                    tensors[f"frozen/{name}"] = p.data.detach().cpu().clone()
    if is_main:
        for name, b in engine.module.named_buffers():
            tensors[f"buffer/{name}"] = b.detach().cpu().clone()
    master = (client_state.get("ema") or {}).get("master")
    if master is None:
        return
    targets = _ema_targets(engine.module)
    if len(targets) != len(master):
        raise RuntimeError(f"the EMA master has {len(master)} tensors, the EMA target {len(targets)} parameters")
    world = dist.get_world_size() if dist.is_initialized() else 1
    for i, (piece, p) in enumerate(zip(master, targets)):
        piece = piece.to(engine.device).contiguous()
        pieces = [torch.empty_like(piece) for _ in range(world)]
        if world > 1:
            dist.all_gather(pieces, piece)
        else:
            pieces = [piece]
        if is_main:
            tensors[f"ema/{i}"] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).float().cpu().clone()


# -- load ------------------------------------------------------------------------------------


def load_full_state(engine, path: Path, *, load_module: bool) -> dict[str, Any]:
    """Put the state :func:`save_full_state` wrote into ``engine``, cut for this world size. Collective.

    Args:
        engine: A freshly built ZeRO-1/2/3 engine of the same model, on any number of ranks.
        path: The downloaded ``full/state.safetensors``.
        load_module: Also set the module's parameters and buffers, the LR schedule and
            DeepSpeed's counters (ZeRO-3, which DeepSpeed cannot load on another size at all);
            ``False`` after DeepSpeed loaded those without optimizer states (ZeRO-1/2).

    Returns:
        The client state the checkpoint holds, with ``ema.master`` cut for this rank under ZeRO-3.

    Raises:
        ValueError: When the checkpoint's trainable parameters are not this model's.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    meta = load_state(path)
    tensors: dict[str, torch.Tensor] = meta["tensors"]
    trainable = _trainable(engine)
    names = [n for n, _ in trainable]
    if names != meta["params"]:
        differ = sorted(set(names) ^ set(meta["params"]))[:5]
        raise ValueError(f"{path}: the checkpoint's trainable parameters are not this model's (differ: {differ or 'order'})")
    if load_module:
        _set_zero3_module(engine, tensors)
        if engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
            engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        for k, v in meta["engine"].items():
            setattr(engine, k, v)
    _init_adam_state(engine, meta["adam_step"])
    for name, p in trainable:
        for key in (None, *_MOMENTS):
            value = tensors[f"{key or 'master'}/{name}"].to(engine.device)
            if hasattr(p, "ds_id"):
                _set_zero3_partition(engine.optimizer, p, value, key)
            elif key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
    groups = engine.optimizer.param_groups
    if len(groups) != len(meta["param_groups"]):
        raise ValueError(f"{path}: {len(meta['param_groups'])} optimizer groups saved, this optimizer has {len(groups)}")
    for g, saved in zip(groups, meta["param_groups"]):
        g.update(saved)  # the learning rate of the next step lives here, not in the scheduler
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for f, v in meta["loss_scaler"].items():
        if scaler is not None and hasattr(scaler, f):
            setattr(scaler, f, v)
    client = dict(meta["client"])
    if engine.zero_optimization_stage() == 3 and any(k.startswith("ema/") for k in tensors):
        client["ema"] = {"master": _ema_pieces(engine, tensors)}
    return client


def _init_adam_state(engine, step: float) -> None:
    """Give Adam its state before the first step, so that the fragment API has moments to set.

    A fresh engine's AdamW creates ``exp_avg``/``exp_avg_sq`` lazily in its first step, and
    ZeRO-1/2 links each parameter to its slice of them only then.
    """
    base = engine.optimizer.optimizer
    for flat in _flat_masters(engine):
        state = base.state[flat]
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for m in _MOMENTS:
            if m not in state:
                state[m] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    _link_moments(engine)


def _link_moments(engine) -> None:
    """(Re)link each ZeRO-1/2 parameter to its slice of Adam's moments.

    DeepSpeed 0.19 links them once, right after stepping the first optimizer group, when the
    other groups have no moments yet: their parameters stay linked to none, and
    ``safe_get_full_optimizer_state`` fails for them. Linking again once every group has its
    state fixes that; the state tensors are updated in place, so the link stays valid.
    """
    if engine.zero_optimization_stage() not in (1, 2):
        return  # ZeRO-3 reads optimizer.state at each call
    if not hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        raise RuntimeError(f"{type(engine.optimizer).__name__} cannot link parameters to optimizer state in this DeepSpeed version")
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def _set_zero3_partition(opt, p: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's piece of ``value`` into the float32 master (``key=None``) or Adam state ``key`` of ZeRO-3 parameter ``p``.

    DeepSpeed's own ``set_full_hp_param`` cuts ``ceil(numel / world)`` elements at
    ``rank * ceil(numel / world)`` without padding ``value``, so it fails on the last ranks
    for any parameter whose size the world size does not divide (a scalar on 3 ranks).
    """
    for fn in ("_get_fp32_opt_state_partition", "_get_param_partition_rank"):
        if not hasattr(opt, fn):
            raise RuntimeError(f"{type(opt).__name__} has no {fn} in this DeepSpeed version; ZeRO-3 state cannot be re-cut")
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    flat = value.reshape(-1)
    lo = part.numel() * opt._get_param_partition_rank(p)
    n = max(0, min(part.numel(), flat.numel() - lo))
    part.data.zero_()  # the padding past the parameter's end
    part.data[:n].copy_(flat[lo : lo + n])


def _set_zero3_module(engine, tensors: dict[str, torch.Tensor]) -> None:
    """Every ZeRO-3 parameter from its full value (trainable: the master, cast), every buffer."""
    import deepspeed

    for name, p in engine.module.named_parameters():
        value = tensors[f"master/{name}"] if p.requires_grad else tensors.get(f"frozen/{name}")
        if value is None:
            raise ValueError(f"the checkpoint's full state has no value of {name}")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.dtype).view(p.shape))
    for name, b in engine.module.named_buffers():
        if f"buffer/{name}" in tensors:
            b.copy_(tensors[f"buffer/{name}"])


def _ema_pieces(engine, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """This rank's padded piece of each EMA master tensor, as ZeRO-3 partitions the target on this world size."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = []
    for i, p in enumerate(_ema_targets(engine.module)):
        size = p.ds_tensor.numel()
        full = tensors[f"ema/{i}"].reshape(-1)
        piece = torch.zeros(size, dtype=torch.float32)
        lo = rank * size
        n = max(0, min(size, full.numel() - lo))
        piece[:n] = full[lo : lo + n]
        out.append(piece)
    return out
