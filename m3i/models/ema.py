"""The EMA target (encoder + projector) and its momentum schedule. [sim: BYOL-style]"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from m3i.models.vit import patch_tokens

__all__ = ["ema_momentum", "EMATarget"]


def ema_momentum(step: int, total_steps: int, m0: float) -> float:
    """Cosine momentum schedule from ``m0`` at step 0 to 1 at ``total_steps``. [sim]

    ``m = 1 - (1 - m0) * (cos(pi * step / total_steps) + 1) / 2``; steps outside
    ``[0, total_steps]`` are clamped.

    Args:
        step: Optimizer steps done.
        total_steps: Steps of the whole run (> 0).
        m0: Momentum at step 0, in ``[0, 1]``.

    Returns:
        The momentum for this step.

    Raises:
        ValueError: If ``total_steps <= 0`` or ``m0`` is outside ``[0, 1]``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0.0 <= m0 <= 1.0:
        raise ValueError(f"m0={m0} is out of range; allowed [0, 1]")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMATarget(nn.Module):
    """A frozen copy of encoder + projector that follows the online one by EMA.

    Lives inside the model so its weights are saved with it; never takes gradients and
    always runs in eval mode (no stochastic depth). Targets are its dense patch tokens,
    layer-normalised without affine. [sim]

    Args:
        backbone: The online timm ViT to copy.
        projector: The online projector to copy.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.projector = copy.deepcopy(projector)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "EMATarget":
        """Stay in eval mode whatever the parent asks."""
        return super().train(False)

    @torch.no_grad()
    def update(self, backbone: nn.Module, projector: nn.Module, momentum: float) -> None:
        """``target = momentum * target + (1 - momentum) * online``, parameters and float buffers."""
        online = [*backbone.parameters(), *projector.parameters()]
        target = [*self.backbone.parameters(), *self.projector.parameters()]
        assert len(online) == len(target), "online and target modules differ"
        torch._foreach_lerp_(target, online, 1.0 - momentum)
        for mod_o, mod_t in ((backbone, self.backbone), (projector, self.projector)):
            for b_o, b_t in zip(mod_o.buffers(), mod_t.buffers()):
                b_t.copy_(b_o)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense targets of full, unmasked views: ``[N, 3, H, W] -> [N, L, proj_dim]``, float32."""
        tokens = self.projector(patch_tokens(self.backbone, images)).float()  # [N, L, Dp]
        return F.layer_norm(tokens, tokens.shape[-1:])
