"""EMA updates of the target that also work under ZeRO-3 and in bf16/fp16.

Under ZeRO-3 a parameter's data lives in ``p.ds_tensor`` (this rank's flat partition);
online and target parameters of equal shape are partitioned alike, so the update is
local. In bf16, ``t += 0.005 * (o - t)`` mostly rounds to nothing, so a float32 master
copy of the target takes the update and is cast back.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMAUpdater"]


def _data(p: torch.Tensor, zero3: bool) -> torch.Tensor:
    return p.ds_tensor if zero3 and hasattr(p, "ds_tensor") else p.data


class EMAUpdater:
    """Moves ``model.target`` toward ``model.backbone`` + ``model.projector``.

    Args:
        model: The (DeepSpeed-wrapped engine's) M3I module.
        zero3: Whether ZeRO-3 partitions the parameters.
        fp32_master: Keep a float32 master copy of the target (for bf16/fp16 runs).
    """

    def __init__(self, model: nn.Module, *, zero3: bool, fp32_master: bool) -> None:
        self.model = model
        self.zero3 = zero3
        self.enabled = getattr(model, "use_img", False)
        if not self.enabled:
            self.master = None
            return
        online = [*model.backbone.parameters(), *model.projector.parameters()]
        target = [*model.target.backbone.parameters(), *model.target.projector.parameters()]
        if len(online) != len(target):
            raise RuntimeError("the online and EMA target modules have different parameters")
        self.online, self.target = online, target
        self.master = [_data(t, zero3).detach().float().clone() for t in target] if fp32_master else None

    @torch.no_grad()
    def step(self, momentum: float) -> None:
        if not self.enabled:
            return
        online = [_data(p, self.zero3) for p in self.online]
        target = [_data(p, self.zero3) for p in self.target]
        if self.master is None:
            torch._foreach_lerp_(target, online, 1.0 - momentum)
        else:
            torch._foreach_lerp_(self.master, [o.float() for o in online], 1.0 - momentum)
            for t, m in zip(target, self.master):
                t.copy_(m)
        self.model.ema_m.fill_(momentum)

    def state_dict(self) -> dict:
        return {"master": [m.cpu() for m in self.master] if self.master is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.master is not None and state.get("master") is not None:
            for m, s in zip(self.master, state["master"]):
                m.copy_(s)
