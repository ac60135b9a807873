"""M3I models: a registry of ViT variants, one factory, and the all-in-one model.

    model = build_model(cfg, num_classes=8)      # M3IModel; forward(batch) -> loss parts
    model.update_ema(ema_momentum(step, total_steps, cfg.model.ema_m0))
    model.encode(images)                         # [N, D] pooled online embedding
    model.backbone                               # the timm ViT (export saves its state dict)
"""

from __future__ import annotations

from m3i.config import Config
from m3i.models.ema import EMATarget, ema_momentum
from m3i.models.heads import Predictor, Projector
from m3i.models.m3i import M3IModel
from m3i.models.pos_embed import grid_positions, position_features, view_positions
from m3i.models.registry import (
    BackboneSpec,
    backbone_kwargs,
    create_backbone,
    list_models,
    register_model,
    resolve_backbone,
)
from m3i.models.text_encoder import TextEncoder
from m3i.models.vit import encoder_tokens, patch_tokens, pool_tokens, same_image_mask

__all__ = [
    "BackboneSpec",
    "EMATarget",
    "M3IModel",
    "Predictor",
    "Projector",
    "TextEncoder",
    "backbone_kwargs",
    "build_model",
    "create_backbone",
    "create_model",
    "ema_momentum",
    "grid_positions",
    "list_models",
    "encoder_tokens",
    "patch_tokens",
    "pool_tokens",
    "same_image_mask",
    "position_features",
    "register_model",
    "resolve_backbone",
    "view_positions",
]


def build_model(cfg: Config, num_classes: int | None = None) -> M3IModel:
    """The one model factory.

    Args:
        cfg: The run config; ``model.backbone`` is a registered variant or a timm ViT name.
        num_classes: Classes of the category head; ``None`` uses ``cfg.model.num_classes``
            (the train loop passes the count from the data index when that is 0).

    Returns:
        A freshly initialised :class:`M3IModel` (no weights downloaded).

    Raises:
        ValueError: On an unknown backbone, a size mismatch, or no branch left to train.
    """
    return M3IModel(cfg, num_classes=num_classes)


create_model = build_model
"""timm-style alias of :func:`build_model`."""
