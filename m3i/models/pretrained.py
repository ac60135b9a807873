"""A pretrained image encoder, from an exported model or a raw training checkpoint.

    enc = load_encoder("s3://models/m3i-demo/v00000500-1a2b3c4d")    # exported: config.json + model.safetensors
    enc = load_encoder("runs/demo")                                   # a run: its latest complete checkpoint
    enc = load_encoder("runs/demo/checkpoints/step-00000500")         # one checkpoint
    feats = embed(enc.module, images)                                 # [N, 3, S, S] -> [N, D]

What ``m3i evaluate`` scores and ``train.init_from`` starts from. Either way the encoder is a
plain timm ViT (``num_classes=0``). For a checkpoint it is the online encoder (``backbone.*``, the
one ``M3IModel.encode`` runs), read in float32 by :class:`m3i.artifacts.zero.BackboneReader` (any
ZeRO stage, world size and precision), exactly what ``m3i export`` writes; :func:`embed` gives the
same features as ``M3IModel.encode``. The files are read through :mod:`m3i.artifacts`, so an
unsafe or damaged one is refused there with :class:`m3i.artifacts.ArtifactError`.

An export is built as timm builds it: ``config.json``'s ``architecture`` (timm's constructor)
with its ``model_args``. ``Encoder.info["architecture"]`` names the network itself, for both
sources: an export's ``m3i_architecture``, or for an export written before m3i recorded it (its
``architecture`` was only the constructor) :func:`m3i.models.registry.architecture_name` of the
loaded network, as for a checkpoint.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from m3i.artifacts.checkpoint import MARKER, find_latest, locate_checkpoint, run_output_of
from m3i.artifacts.export import CONFIG, MANIFEST, PREFIXES, WEIGHTS, is_export, read_exported_config, read_exported_weights
from m3i.artifacts.zero import BackboneReader
from m3i.config import Config, from_dict
from m3i.models.groups import optimizer_group_names
from m3i.models.registry import architecture_name, backbone_kwargs, create_backbone
from m3i.storage import Store, open_store
from m3i.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["EVAL_CROP_PCT", "Encoder", "embed", "load_encoder", "load_exported"]

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
    """Builds the same architecture with fresh weights drawn from the global torch RNG (see :func:`m3i.evaluate.random_init`)."""
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


def _recorded_seed(manifest: dict[str, Any]) -> tuple[int, str]:
    """The training seed an export's manifest records (``seed``, or ``train.seed`` of a ``train_config``); else 0."""
    seed = manifest.get("seed")
    if seed is None:
        seed = ((manifest.get("train_config") or {}).get("train") or {}).get("seed")
    return (int(seed), MANIFEST) if isinstance(seed, int) else (0, "default")


def _recorded_data(manifest: dict[str, Any]) -> str:
    """The training data set an export's manifest records (``data_shards``, or ``data.shards`` of a ``train_config``)."""
    shards = manifest.get("data_shards") or ((manifest.get("train_config") or {}).get("data") or {}).get("shards")
    return shards if isinstance(shards, str) else ""


def embed(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits embedding of a timm ViT: ``[N, 3, S, S] -> [N, D]`` (as ``M3IModel.encode``)."""
    return module.forward_head(module.forward_features(images), pre_logits=True)


def _exported_args(config: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of an export's ``config.json``."""
    args = dict(config.get("model_args") or {})
    args.update(pretrained=False, num_classes=0)
    return args


def _manifest_of(store: Store) -> dict[str, Any]:
    """``export.json`` (the export's manifest: the model's name, provenance and file list); ``{}`` in a bare folder."""
    return store.read_json(MANIFEST) if store.exists(MANIFEST) else {}


def load_exported(uri: str) -> nn.Module:
    """A plain timm model from an ``m3i export`` folder, as a user of the export would build it.

    ``timm.create_model(config['architecture'], pretrained=False, num_classes=0, **config['model_args'])``
    with the weights of ``model.safetensors`` (timm key names) loaded strictly, in float32, eval mode.

    Raises:
        StorageError: When a file is missing.
        ValueError: When the config names no architecture or the weights do not fit it.
        m3i.artifacts.DamagedArtifactError: When ``model.safetensors`` is not the file ``export.json``
            lists, or not a safetensors file.
    """
    store = open_store(uri)
    return _build_exported(store, read_exported_config(uri), _manifest_of(store))


def _build_exported(store: Store, config: dict[str, Any], manifest: dict[str, Any]) -> nn.Module:
    args = _exported_args(config)
    model = timm.create_model(config["architecture"], **args)
    state = read_exported_weights(store, manifest)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{store.uri}/{WEIGHTS} does not fit {config['architecture']} {args}: {e}") from None
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
    recorded = config.get("m3i_architecture")
    return recorded if isinstance(recorded, str) and recorded else architecture_name(module, config["architecture"])


def _encoder_from_export(uri: str) -> Encoder:
    store = open_store(uri)
    config = read_exported_config(uri)
    manifest = _manifest_of(store)
    module = _build_exported(store, config, manifest)
    network = _exported_architecture(config, module)
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


def _encoder_from_checkpoint(uri: str) -> Encoder:
    """The online encoder of a checkpoint, read in float32 by the exporter's reader (every ZeRO stage)."""
    src = locate_checkpoint(uri)
    if not isinstance(src.manifest.get("config"), dict):
        raise ValueError(f"checkpoint {src.uri} records no run config in its {MARKER}; it cannot be rebuilt")
    cfg: Config = from_dict(Config, src.manifest["config"], section="checkpoint config")
    module = create_backbone(cfg)
    params = [n for n, _ in module.named_parameters()]
    num_classes = int(src.manifest.get("num_classes") or 0)
    with tempfile.TemporaryDirectory(prefix="m3i-evaluate-") as tmp:
        src.local_dir = Path(tmp)  # files of an s3:// checkpoint are downloaded here (local ones read in place)
        reader = BackboneReader(src.keys, src.path, PREFIXES["online"], params, group_names=optimizer_group_names(cfg, num_classes))
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
        m3i.artifacts.ArtifactError: (a ``ValueError``) When a file is unsafe (a planted pickle) or damaged.
        StorageError: When storage fails after retries.
    """
    if not uri:
        raise ValueError("evaluate.model='' is not allowed; give an exported model, a checkpoint or a run folder")
    store = open_store(uri)
    if is_export(store):
        return _encoder_from_export(store.uri)
    if store.exists(MARKER) or find_latest(store.uri) is not None:
        return _encoder_from_checkpoint(store.uri)
    raise ValueError(
        f"evaluate.model={uri!r} holds neither an exported model ({CONFIG} + {WEIGHTS}), "
        f"one checkpoint ({MARKER}) nor a run with a complete checkpoint"
    )
