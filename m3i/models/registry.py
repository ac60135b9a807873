"""M3I model variants by name, the backbone factory and the one model factory.

    model = build_model(cfg, num_classes=8)      # an M3IModel
    backbone = create_backbone(cfg)              # the bare timm ViT, same keys as export
    list_models()                                # ['m3i_vit_base', 'm3i_vit_micro', ...]

``model.backbone`` accepts a registered variant or any timm VisionTransformer name; the
backbone is always built without pretrained weights, so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import timm
from timm.models import VisionTransformer

from m3i.config import Config

__all__ = ["BackboneSpec", "register_model", "list_models", "resolve_backbone", "backbone_kwargs", "create_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """A timm model name and the constructor arguments that make an M3I variant of it."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Callable[[], BackboneSpec]] = {}


def register_model(fn: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Decorator: register ``fn`` (returning a :class:`BackboneSpec`) under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model variant {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered M3I variants."""
    return sorted(_REGISTRY)


@register_model
def m3i_vit_micro() -> BackboneSpec:
    """A 4-block, 96-wide ViT for CPU demos and tests. [choice]"""
    return BackboneSpec("vit_tiny_patch16_224", {"embed_dim": 96, "depth": 4, "num_heads": 3})


@register_model
def m3i_vit_tiny() -> BackboneSpec:
    """ViT-Ti/16 (5.7M)."""
    return BackboneSpec("vit_tiny_patch16_224")


@register_model
def m3i_vit_small() -> BackboneSpec:
    """ViT-S/16 (22M)."""
    return BackboneSpec("vit_small_patch16_224")


@register_model
def m3i_vit_base() -> BackboneSpec:
    """ViT-B/16 (86M), SiameseIM's main model. [sim]"""
    return BackboneSpec("vit_base_patch16_224")


def resolve_backbone(name: str) -> BackboneSpec:
    """The spec of a registered variant, or of a timm VisionTransformer name.

    Raises:
        ValueError: If ``name`` is neither.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if timm.is_model(name):
        return BackboneSpec(name)
    raise ValueError(
        f"model.backbone={name!r} is not known; choose one of {list_models()} "
        "or any timm VisionTransformer name (timm.list_models('vit_*'))"
    )


def backbone_kwargs(cfg: Config) -> tuple[str, dict[str, Any]]:
    """``(timm_name, kwargs)`` such that ``timm.create_model(timm_name, **kwargs)`` rebuilds the backbone.

    Export and evaluation use this to load ``model.backbone.state_dict()`` into a plain timm model.
    The global pool is ``model.global_pool``; timm puts its final norm after pooling for ``avg``,
    ``max`` and ``avgmax`` (``fc_norm``) and before it for ``token``.
    """
    spec = resolve_backbone(cfg.model.backbone)
    kwargs = dict(spec.kwargs)
    kwargs.update(
        pretrained=False,
        num_classes=0,
        img_size=cfg.data.image_size,
        patch_size=cfg.model.patch_size,
        drop_path_rate=cfg.model.drop_path,
        global_pool=cfg.model.global_pool,
    )
    return spec.timm_name, kwargs


def create_backbone(cfg: Config) -> VisionTransformer:
    """The online image encoder: a timm ViT, no weights downloaded, no classifier.

    Raises:
        ValueError: If the name is unknown, is not a VisionTransformer, or the image size is not
            a multiple of the patch size.
    """
    if cfg.data.image_size % cfg.model.patch_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} is not a multiple of model.patch_size={cfg.model.patch_size}"
        )
    name, kwargs = backbone_kwargs(cfg)
    try:
        net = timm.create_model(name, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"model.backbone={cfg.model.backbone!r} is not a timm VisionTransformer ({err}); "
            f"allowed: {list_models()} or a timm VisionTransformer name"
        ) from None
    if not isinstance(net, VisionTransformer):
        raise ValueError(
            f"model.backbone={cfg.model.backbone!r} builds a {type(net).__name__}; "
            f"allowed: {list_models()} or a timm VisionTransformer"
        )
    return net
