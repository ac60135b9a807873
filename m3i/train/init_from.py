"""``train.init_from``: a fresh run's backbone loaded from an export, a checkpoint or a run's output."""

from __future__ import annotations

import logging
from typing import Any

import torch

from m3i.config import Config
from m3i.storage import StorageError, open_store
from m3i.train.dist import DistInfo, all_ok

__all__ = ["init_backbone", "init_on_every_rank"]

log = logging.getLogger(__name__)


def _vit_facts(vit: torch.nn.Module) -> dict[str, Any]:
    """What makes two timm ViTs the same encoder, beyond their state dicts' keys and shapes."""
    return {
        "depth": len(vit.blocks),
        "width": int(vit.embed_dim),
        "heads": int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 0,
        "patch size": tuple(vit.patch_embed.patch_size),
        "image size": tuple(vit.patch_embed.img_size),
        "global pool": vit.global_pool,
    }


def init_backbone(cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    """Load ``cfg.train.init_from``'s encoder into ``model.backbone`` (and the EMA target's backbone).

    Call it before :func:`m3i.train.engine.build_engine`, so that ZeRO partitions the loaded weights.
    Everything else in ``model`` is left as initialised.

    Args:
        cfg: The run config; ``train.init_from`` names an ``m3i export`` folder, a checkpoint or a
            run's output folder, local or ``s3://``.
        model: The freshly built :class:`m3i.models.M3IModel`.

    Returns:
        What was loaded, for the checkpoint metadata: ``uri``, ``kind`` (``exported`` or
        ``checkpoint``), ``name``, ``step`` and ``modules`` (the model's submodules overwritten).

    Raises:
        ValueError: When ``train.init_from`` holds no export, checkpoint or run, or its encoder is
            not this run's (the message lists what differs).
        m3i.storage.StorageError: When storage fails after retries.
    """
    from m3i.artifacts.checkpoint import MARKER as CHECKPOINT_MARKER
    from m3i.artifacts.checkpoint import find_latest
    from m3i.artifacts.export import CONFIG as EXPORT_CONFIG
    from m3i.artifacts.export import WEIGHTS as EXPORT_WEIGHTS
    from m3i.models.pretrained import load_encoder

    uri = cfg.train.init_from
    store = open_store(uri)
    # load_encoder's own refusal names evaluate.model; check here to name the field the user set.
    if not (store.exists(EXPORT_CONFIG) and store.exists(EXPORT_WEIGHTS)) and not store.exists(CHECKPOINT_MARKER) and find_latest(store.uri) is None:
        raise ValueError(
            f"train.init_from={uri!r} holds neither an m3i export ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}), one checkpoint "
            f"({CHECKPOINT_MARKER}) nor a run output with a complete checkpoint"
        )
    enc = load_encoder(store.uri)
    source = enc.module.state_dict()
    want = model.backbone.state_dict()
    facts_src, facts_run = _vit_facts(enc.module), _vit_facts(model.backbone)
    differ = [f"{k} {facts_src[k]} != {facts_run[k]}" for k in facts_run if facts_src[k] != facts_run[k]]
    missing, extra = sorted(set(want) - set(source)), sorted(set(source) - set(want))
    shapes = [f"{k} {tuple(source[k].shape)} != {tuple(v.shape)}" for k, v in want.items() if k in source and source[k].shape != v.shape]
    if differ or missing or extra or shapes:
        raise ValueError(
            f"train.init_from={uri!r} ({enc.kind}, {enc.info.get('architecture', '?')}) does not fit this run's backbone "
            f"(model.backbone={cfg.model.backbone!r}, model.patch_size={cfg.model.patch_size}, "
            f"data.image_size={cfg.data.image_size}, model.global_pool={cfg.model.global_pool!r}): source != run: "
            + "; ".join(differ + ([f"missing keys {missing[:5]}"] if missing else []) + ([f"unexpected keys {extra[:5]}"] if extra else []) + shapes[:5])
        )
    targets = {"backbone": model.backbone}
    if getattr(model, "use_img", False):
        targets["target.backbone"] = model.target.backbone
    for module in targets.values():
        module.load_state_dict(source, strict=True)
    return {"uri": enc.uri, "kind": enc.kind, "name": enc.name, "step": enc.step, "modules": list(targets)}


def init_on_every_rank(cfg: Config, model: torch.nn.Module, info: DistInfo) -> dict[str, Any]:
    """:func:`init_backbone` on each rank; all ranks fail together, so none waits in a collective for a failed peer."""
    err: Exception | None = None
    loaded: dict[str, Any] = {}
    try:
        loaded = init_backbone(cfg, model)
    except (ValueError, StorageError, OSError) as e:
        err = e
    if not all_ok(err is None):
        raise err or StorageError(f"train.init_from={cfg.train.init_from!r}: loading failed on another rank")
    if info.is_main:
        log.info(
            "train.init_from: %s loaded from %s %s (%s, step %s); the rest of the model starts fresh",
            " and ".join(loaded["modules"]), loaded["kind"], loaded["uri"], loaded["name"], loaded["step"],
        )
    return loaded
