"""The image encoder to score, from an exported model or a raw training checkpoint.

    enc = load_encoder("s3://models/m3i-demo/v00000500-1a2b3c4d")    # exported: config.json + model.safetensors
    enc = load_encoder("runs/demo")                                   # a run: its latest complete checkpoint
    enc = load_encoder("runs/demo/checkpoints/step-00000500")         # one checkpoint
    feats = embed(enc.module, images)                                 # [N, 3, S, S] -> [N, D]
    base = random_init(enc)                                           # same architecture, as training initialised it

Either way the encoder is a plain timm ViT (``num_classes=0``). For a checkpoint it is the
online encoder (``backbone.*``, the one ``M3IModel.encode`` runs), read in float32 by
:class:`m3i.export.BackboneReader` (any ZeRO stage, world size and precision), exactly what
``m3i export`` writes; :func:`embed` gives the same features as ``M3IModel.encode``.

An export is built as timm builds it: ``config.json``'s ``architecture`` (timm's constructor)
with its ``model_args``. ``Encoder.info["architecture"]`` names the network itself, for both
sources: an export's ``m3i_architecture``, or for an export written before m3i recorded it (its
``architecture`` was only the constructor) :func:`m3i.models.registry.architecture_name` of the
loaded network, as for a checkpoint.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from m3i.config import Config, from_dict
from m3i.storage import open_store
from m3i.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Encoder", "embed", "load_encoder", "load_exported", "random_init", "read_exported_config"]

log = logging.getLogger(__name__)

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "export.json"
CHECKPOINT_MARKER = "complete.json"
EVAL_CROP_PCT = 0.875
"""The default centre crop of :class:`m3i.transforms.EvalTransform` (timm/DeiT); an export's ``crop_pct`` wins."""


@dataclass
class Encoder:
    """A frozen-feature extractor and what evaluation needs to know about it."""

    module: nn.Module
    """A timm ViT without classifier; :func:`embed` gives its pooled embedding."""
    image_size: int
    """Side of the square input it was trained at."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = EVAL_CROP_PCT
    """Centre crop of the eval view: resize the short side to ``image_size / crop_pct``, crop ``image_size``."""
    kind: str = "checkpoint"
    """``checkpoint`` or ``exported``."""
    uri: str = ""
    """Where it was loaded from (the checkpoint or export folder itself)."""
    name: str = ""
    """Model name: the run id of a checkpoint, the export's name (or architecture)."""
    step: int | None = None
    """Training step of the weights, where known."""
    info: dict[str, Any] = field(default_factory=dict)
    """``architecture`` (what the network is, e.g. ``vit_w96_d4_h3_p8_32``), ``timm_architecture`` (the
    timm name that constructs it), ``run_id``, and per source ``version`` or ``num_classes``."""
    build: Callable[[], nn.Module] | None = None
    """Builds the same architecture with fresh weights drawn from the global torch RNG (see :func:`random_init`)."""
    seed: int = 0
    """``torch.manual_seed`` that training called before building the model: ``train.seed`` of the run."""
    seed_source: str = "default"
    """Where :attr:`seed` comes from: ``run config`` (a checkpoint's ``train.seed``), ``export.json``, or
    ``default`` (an export that records none: 0)."""
    history_uri: str = ""
    """Folder whose ``history.jsonl`` is the training history of these weights: a checkpoint's run
    output (the folder holding ``checkpoints/``), an export's own folder; empty when there is none."""
    data_shards: str = ""
    """The data set (``data.shards``) the weights were trained on, as the export's ``export.json`` or
    the checkpoint's run config records it; empty when the model records none."""


def random_init(encoder: Encoder) -> nn.Module:
    """The encoder's architecture at random init, seeded as training seeds it, in eval mode on the CPU.

    Training calls ``torch.manual_seed(train.seed)`` and then builds the model, backbone first
    (:func:`m3i.train.train`, :class:`m3i.models.M3IModel`), so for a checkpoint this is the
    backbone the run started from (unless ``train.init_from`` loaded other weights over it). The
    caller's RNG state is left as it was.

    Raises:
        ValueError: When the encoder carries no ``build`` (one made by hand).
    """
    if encoder.build is None:
        raise ValueError(f"the encoder from {encoder.uri or 'memory'} cannot be rebuilt at random init: it has no build")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder.seed)
        module = encoder.build()
    return module.eval()


def _recorded_seed(manifest: dict[str, Any]) -> tuple[int, str]:
    """The training seed an export's manifest records (``seed``, or ``train.seed`` of a ``train_config``); else 0."""
    seed = manifest.get("seed")
    if seed is None:
        seed = ((manifest.get("train_config") or {}).get("train") or {}).get("seed")
    return (int(seed), EXPORT_MANIFEST) if isinstance(seed, int) else (0, "default")


def _recorded_data(manifest: dict[str, Any]) -> str:
    """The training data set an export's manifest records (``data_shards``, or ``data.shards`` of a ``train_config``)."""
    shards = manifest.get("data_shards") or ((manifest.get("train_config") or {}).get("data") or {}).get("shards")
    return shards if isinstance(shards, str) else ""


def embed(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits embedding of a timm ViT: ``[N, 3, S, S] -> [N, D]`` (as ``M3IModel.encode``)."""
    return module.forward_head(module.forward_features(images), pre_logits=True)


def read_exported_config(uri: str) -> dict[str, Any]:
    """``config.json`` of an exported model folder (local or ``s3://``).

    Raises:
        StorageError: When it is missing or not JSON.
        ValueError: When it has no ``architecture``.
    """
    store = open_store(uri)
    config = store.read_json(EXPORT_CONFIG)
    if not isinstance(config, dict) or not config.get("architecture"):
        raise ValueError(f"{store.url(EXPORT_CONFIG)} names no 'architecture'; is {uri!r} an `m3i export` folder?")
    return config


def _exported_args(config: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of an export's ``config.json``."""
    args = dict(config.get("model_args") or {})
    args.update(pretrained=False, num_classes=0)
    return args


def load_exported(uri: str) -> nn.Module:
    """A plain timm model from an ``m3i export`` folder, as a user of the export would build it.

    ``timm.create_model(config['architecture'], pretrained=False, num_classes=0, **config['model_args'])``
    with the weights of ``model.safetensors`` (timm key names) loaded strictly, in float32, eval mode.

    Raises:
        StorageError: When a file is missing.
        ValueError: When the config names no architecture or the weights do not fit it.
    """
    from safetensors.torch import load as load_safetensors

    config = read_exported_config(uri)
    args = _exported_args(config)
    model = timm.create_model(config["architecture"], **args)
    state = load_safetensors(open_store(uri).get_bytes(EXPORT_WEIGHTS))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{uri}/{EXPORT_WEIGHTS} does not fit {config['architecture']} {args}: {e}") from None
    return model.eval()


def _data_cfg(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Preprocessing from timm's ``pretrained_cfg`` (what ``timm.data.resolve_data_config`` reads), else defaults."""
    pre = config.get("pretrained_cfg") or {}
    size = pre.get("input_size")
    return {
        "image_size": int(size[-1]) if size else int(model.patch_embed.img_size[-1]),
        "mean": tuple(float(x) for x in pre.get("mean", IMAGENET_MEAN)),
        "std": tuple(float(x) for x in pre.get("std", IMAGENET_STD)),
        "crop_pct": float(pre.get("crop_pct", EVAL_CROP_PCT)),
    }


def _exported_architecture(config: dict[str, Any], module: nn.Module) -> str:
    """What an exported network is: ``config.json``'s ``m3i_architecture``, else (an older export, whose
    ``architecture`` is only timm's constructor) the name :func:`m3i.models.registry.architecture_name`
    gives the loaded ``module``."""
    from m3i.models.registry import architecture_name

    recorded = config.get("m3i_architecture")
    return recorded if isinstance(recorded, str) and recorded else architecture_name(module, config["architecture"])


def _encoder_from_export(uri: str) -> Encoder:
    store = open_store(uri)
    config = read_exported_config(uri)
    module = load_exported(uri)
    network = _exported_architecture(config, module)
    # export.json (the export's manifest) names the model and its provenance; absent in a bare folder.
    manifest = store.read_json(EXPORT_MANIFEST) if store.exists(EXPORT_MANIFEST) else {}
    seed, seed_source = _recorded_seed(manifest)
    return Encoder(
        module=module,
        **_data_cfg(config, module),
        kind="exported",
        uri=store.uri,
        name=str(manifest.get("name") or network),
        step=manifest.get("step"),
        info={
            "architecture": network, "timm_architecture": config["architecture"],
            "run_id": manifest.get("run_id", ""), "version": manifest.get("version", ""),
        },
        build=functools.partial(timm.create_model, config["architecture"], **_exported_args(config)),
        seed=seed,
        seed_source=seed_source,
        history_uri=store.uri,
        data_shards=_recorded_data(manifest),
    )


def _group_names(cfg: Config, num_classes: int):
    """Parameter names of each optimizer group as training built them (ZeRO-0 mixed-precision checkpoints)."""

    def names() -> list[list[str]]:
        from m3i.models import build_model
        from m3i.train.engine import param_groups

        with torch.device("meta"):
            model = build_model(cfg, num_classes=num_classes)
        by_id = {id(p): n for n, p in model.named_parameters()}
        return [[by_id[id(p)] for p in g["params"]] for g in param_groups(model, cfg.train.weight_decay)]

    return names


def _encoder_from_checkpoint(uri: str) -> Encoder:
    """The online encoder of a checkpoint, read in float32 by the exporter's reader (every ZeRO stage)."""
    from m3i.export import PREFIXES, BackboneReader, locate_checkpoint
    from m3i.train.checkpoint import run_output_of
    from m3i.models import backbone_kwargs, create_backbone
    from m3i.models.registry import architecture_name

    src = locate_checkpoint(uri)
    if not isinstance(src.manifest.get("config"), dict):
        raise ValueError(f"checkpoint {src.uri} records no run config in its {CHECKPOINT_MARKER}; it cannot be rebuilt")
    cfg: Config = from_dict(Config, src.manifest["config"], section="checkpoint config")
    module = create_backbone(cfg)
    params = [n for n, _ in module.named_parameters()]
    num_classes = int(src.manifest.get("num_classes") or 0)
    with tempfile.TemporaryDirectory(prefix="m3i-evaluate-") as tmp:
        src.local_dir = Path(tmp)  # files of an s3:// checkpoint are downloaded here (local ones read in place)
        reader = BackboneReader(src.keys, src.path, PREFIXES["online"], params, group_names=_group_names(cfg, num_classes))
        state = {name: tensor.clone() for name, tensor in reader}
        del reader  # drops the memory maps before the folder goes
    module.load_state_dict(state, strict=True)
    network = architecture_name(module, cfg.model.backbone)
    return Encoder(
        module=module.eval(),
        image_size=cfg.data.image_size,
        kind="checkpoint",
        uri=src.uri,
        name=str(src.manifest.get("run_id") or network),
        step=src.step,
        info={
            "architecture": network, "timm_architecture": backbone_kwargs(cfg)[0],
            "run_id": src.manifest.get("run_id", ""), "num_classes": num_classes,
        },
        build=functools.partial(create_backbone, cfg),
        seed=cfg.train.seed,
        seed_source="run config",
        history_uri=run_output_of(src.uri) or "",
        data_shards=cfg.data.shards,
    )


def load_encoder(uri: str) -> Encoder:
    """The encoder at ``uri``: an exported model folder, one checkpoint, or a run's output folder.

    Args:
        uri: Local path, ``file://`` or ``s3://`` URI.

    Returns:
        The :class:`Encoder`, in float32 and eval mode, on the CPU.

    Raises:
        ValueError: When ``uri`` is empty or holds none of the three, or the weights do not fit.
        StorageError: When storage fails after retries.
    """
    if not uri:
        raise ValueError("evaluate.model='' is not allowed; give an exported model, a checkpoint or a run folder")
    store = open_store(uri)
    if store.exists(EXPORT_CONFIG) and store.exists(EXPORT_WEIGHTS):
        return _encoder_from_export(store.uri)
    from m3i.train.checkpoint import find_latest

    if store.exists(CHECKPOINT_MARKER) or find_latest(store.uri) is not None:
        return _encoder_from_checkpoint(store.uri)
    raise ValueError(
        f"evaluate.model={uri!r} holds neither an exported model ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}), "
        f"one checkpoint ({CHECKPOINT_MARKER}) nor a run with a complete checkpoint"
    )
