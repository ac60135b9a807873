"""M3I model variants by name, the backbone factory and the one model factory.

    model = build_model(cfg, num_classes=8)      # an M3IModel
    backbone = create_backbone(cfg)              # the bare timm ViT, same keys as export
    list_models()                                # ['m3i_vit_base', 'm3i_vit_micro', ...]
    architecture_name(backbone, "m3i_vit_micro") # 'vit_w96_d4_h3_p8_32' at patch 8, 32 px

``model.backbone`` accepts a registered variant or any timm VisionTransformer name; the
backbone is always built without pretrained weights, so nothing is downloaded.

A timm name is a constructor: ``vit_tiny_patch16_224`` with ``patch_size=8, img_size=32`` builds
no ViT-Ti/16 at 224 px. :func:`architecture_name` is the name that says what a backbone is, for
exports, evaluation and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import timm
import torch
from timm.models import VisionTransformer

from m3i.config import Config

__all__ = [
    "BackboneSpec",
    "architecture_name",
    "backbone_kwargs",
    "create_backbone",
    "list_models",
    "register_model",
    "resolve_backbone",
    "spelled_name",
]


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


def spelled_name(net: VisionTransformer) -> str:
    """A name spelled from the network's dimensions: ``vit_w<width>_d<depth>_h<heads>_p<patch>_<image size>``.

    Suffixes only where the ViT departs from the plain layout: ``_mlp<hidden>`` (MLP not 4x wide),
    ``_nocls`` (no class token), ``_reg<n>`` (register tokens). A side that is not square reads
    ``<h>x<w>``. The pooling is not part of it (timm's ``global_pool`` says it). It describes, it does
    not identify: networks that differ elsewhere (a pre-norm CLIP ViT, say) can share it, so an export
    keeps timm's constructor and ``model_args`` beside it.
    """
    width, depth = int(net.embed_dim), len(net.blocks)
    heads = int(net.blocks[0].attn.num_heads) if depth else 0
    name = f"vit_w{width}_d{depth}_h{heads}_p{_side(net.patch_embed.patch_size)}_{_side(net.patch_embed.img_size)}"
    fc1 = getattr(net.blocks[0].mlp, "fc1", None) if depth else None
    if isinstance(fc1, torch.nn.Linear) and fc1.out_features != 4 * width:
        name += f"_mlp{fc1.out_features}"
    if net.cls_token is None:
        name += "_nocls"
    if getattr(net, "num_reg_tokens", 0):
        name += f"_reg{net.num_reg_tokens}"
    return name


def _side(size: Any) -> str:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return f"{h}" if h == w else f"{h}x{w}"


def _signature(net: VisionTransformer) -> tuple[Any, ...]:
    """What two ViTs must share to be the same network: every tensor's name and shape, heads, patch and image size."""
    heads = int(net.blocks[0].attn.num_heads) if len(net.blocks) else 0
    shapes = sorted((k, tuple(v.shape)) for k, v in net.state_dict().items())
    return shapes, heads, tuple(net.patch_embed.patch_size), tuple(net.patch_embed.img_size)


def _builds_exactly(name: str, net: VisionTransformer) -> bool:
    """Whether ``name`` alone (a variant or timm name, at its own patch and image size) builds ``net``."""
    try:
        spec = resolve_backbone(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            native = timm.create_model(spec.timm_name, **{**spec.kwargs, "pretrained": False, "num_classes": 0, "global_pool": net.global_pool})
    except (ValueError, TypeError, RuntimeError, AssertionError):  # unknown, not a ViT, or this pooling is not its
        return False
    return isinstance(native, VisionTransformer) and _signature(native) == _signature(net)


def architecture_name(net: VisionTransformer, claimed: str = "") -> str:
    """The name that says what ``net`` is.

    ``claimed`` (the run's ``model.backbone``, or an old export's timm ``architecture``) when that
    name alone builds exactly this network; else :func:`spelled_name`. ``m3i_vit_micro`` at patch 8
    and 32 px is ``vit_w96_d4_h3_p8_32``; ``m3i_vit_base`` at patch 16 and 224 px stays ``m3i_vit_base``.

    Args:
        net: The timm ViT (a ``meta``-device one will do).
        claimed: A registered variant or timm name the network was built from, or ``""``.

    Returns:
        ``claimed`` or the spelled name.
    """
    return claimed if claimed and _builds_exactly(claimed, net) else spelled_name(net)
