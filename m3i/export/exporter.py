"""``export``: a complete checkpoint -> a versioned folder of timm backbone weights in object storage.

    result = export(cfg)          # cfg.export says which checkpoint, encoder, dtype and where
    result.uri                    # <out>/<name>/v00000500-1a2b3c4d

Under the version prefix: ``model.safetensors``, ``config.json``, ``README.md`` (the model card),
``history.jsonl`` (when the run has one), ``SHA256SUMS`` and, written LAST, the manifest
``export.json`` (the layout, its names and readers: :mod:`m3i.artifacts.export`).

Peak memory stays near one float32 copy of the backbone: checkpoint files are memory-mapped,
only the backbone's tensors are read, and the weights file is written tensor by tensor.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3i import __version__
from m3i.config import Config
from m3i.config.core import from_dict
from m3i.artifacts.checkpoint import MARKER, CheckpointSource, locate_checkpoint, run_output_of
from m3i.artifacts.export import CARD, CONFIG, FORMAT, FORMAT_VERSION, MANIFEST, PREFIXES, SUMS, WEIGHTS
from m3i.artifacts.run import HISTORY_FILE, read_history
from m3i.artifacts.zero import BackboneReader
from m3i.export.card import CardFacts, code_revision, load_call, render_card, render_sums, timm_config
from m3i.export.safetensors_stream import write_safetensors
from m3i.models.groups import optimizer_group_names
from m3i.storage import Store, join_uri, open_store, sha256_file
from m3i.train.history import render_history

__all__ = ["export", "ExportResult"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it holds."""

    uri: str
    """The version prefix: ``<out>/<name>/<version>``."""
    weights: str
    """URI of ``model.safetensors``."""
    config: str
    """URI of ``config.json``."""
    card: str
    """URI of ``README.md``."""
    sums: str
    """URI of ``SHA256SUMS``."""
    manifest: str
    """URI of ``export.json`` (written last)."""
    name: str
    version: str
    step: int
    checkpoint: str
    """The checkpoint read (``.../checkpoints/step-XXXXXXXX``)."""
    encoder: str
    """``online`` or ``ema``."""
    dtype: str
    sha256: str
    """sha256 of ``model.safetensors``."""
    bytes: int
    """Size of ``model.safetensors``."""
    architecture: str
    """What the network is (:func:`m3i.models.registry.architecture_name`): ``model.backbone`` when that
    name alone builds it, else one spelled from its dimensions (``vit_w96_d4_h3_p8_32``)."""
    seconds: float
    history: str | None = None
    """URI of ``history.jsonl`` (the run's loss curves up to ``step``); ``None`` when the run recorded none."""
    timm_architecture: str = ""
    """The timm model name that builds it with ``config.json``'s ``model_args`` (``config.json``'s ``architecture``)."""


def _hash(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_file(f)


def _read_json_uri(uri: str) -> Any:
    parent, _, key = uri.rstrip("/").rpartition("/")
    return open_store(parent or ".").read_json(key)


def _train_config(src: CheckpointSource) -> Config:
    raw = src.manifest.get("config")
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint {src.uri} records no training config in its {MARKER}; it cannot be exported")
    return from_dict(Config, raw, section="checkpoint config")


def _meta_backbone(arch: str, kwargs: dict[str, Any]):
    import timm

    with torch.device("meta"):  # shapes and names only: no memory, no initialisation cost
        return timm.create_model(arch, **kwargs)


def _check_keys(reader: BackboneReader, expected: dict[str, tuple[int, ...]], arch: str) -> None:
    """The checkpoint's encoder must have exactly timm's keys and shapes (``arch`` names the network in the error)."""
    prefix = reader.prefix
    have = {k[len(prefix) :] for k in reader.module if k.startswith(prefix)}
    missing, extra = sorted(set(expected) - have), sorted(have - set(expected))
    shapes = reader.shapes()
    wrong = [f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or extra or wrong:
        raise ValueError(
            f"the checkpoint's {prefix}* does not match {arch}: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )


def _history_rows(src: CheckpointSource) -> list[dict[str, Any]]:
    """The run's history up to the exported step: the curves that led to these weights, none after."""
    run = run_output_of(src.uri)
    return [r for r in read_history(run) if r["step"] <= src.step] if run is not None else []


def _model_name(name: str, run_id: str) -> str:
    if name:
        return name
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", run_id or "m3i").strip("-._") or "m3i"
    return safe[:128]


def export(cfg: Config) -> ExportResult:
    """Export the backbone of a complete checkpoint as plain timm weights, config and model card.

    Args:
        cfg: The config; ``cfg.export`` drives the export (``export.checkpoint`` empty takes
            ``train.output``). The architecture comes from the training config in the checkpoint.

    Returns:
        The URIs written and what they hold.

    Raises:
        ValueError: No complete checkpoint at the URI, ``export.weights=ema`` for a run without an
            EMA target, a checkpoint whose encoder does not match its timm architecture, or an
            ``export.metrics`` file that is not a JSON object.
        m3i.storage.StorageError: Storage failed after retries.
    """
    from m3i.models import backbone_kwargs
    from m3i.models.registry import architecture_name

    t0 = time.monotonic()
    e = cfg.export
    src = locate_checkpoint(e.checkpoint or cfg.train.output)
    meta = src.manifest
    train_cfg = _train_config(src)
    if e.weights == "ema" and not train_cfg.objective.use_img:
        raise ValueError(
            "export.weights='ema' but the run trained without the image branch (objective.use_img=false), "
            "so it has no EMA target; use export.weights=online"
        )
    evaluation = _read_json_uri(e.metrics) if e.metrics else None  # before the long part: fail early
    if evaluation is not None and not isinstance(evaluation, dict):
        raise ValueError(f"export.metrics={e.metrics!r} is a JSON {type(evaluation).__name__}; expected an object of scores")
    arch, kwargs = backbone_kwargs(train_cfg)
    net = _meta_backbone(arch, kwargs)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    params = [n for n, _ in net.named_parameters()]
    if set(params) != set(expected):
        raise ValueError(f"timm {arch} has buffers in its state dict ({sorted(set(expected) - set(params))[:5]}); export reads parameters only")
    model_args = {k: v for k, v in kwargs.items() if k not in ("pretrained", "drop_path_rate")}
    network = architecture_name(net, train_cfg.model.backbone)
    described = f"timm {arch}" if network == arch else f"{network} (timm {arch} with {model_args})"
    name = _model_name(e.name, str(meta.get("run_id", "")))
    history = _history_rows(src)
    log.info("export: %s (step %d) -> %s/%s, %s encoder in %s", src.uri, src.step, e.out, name, e.weights, e.dtype)

    staging = Path(e.staging_dir) if e.staging_dir else None
    if staging:
        staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="m3i-export-", dir=staging) as tmp:
        src.local_dir = Path(tmp) / "checkpoint"
        out = Path(tmp) / "out"
        out.mkdir()
        reader = BackboneReader(
            src.keys, src.path, PREFIXES[e.weights], params,
            group_names=optimizer_group_names(train_cfg, int(meta.get("num_classes") or 0)),
        )
        _check_keys(reader, expected, described)
        dtype = _DTYPES[e.dtype]
        specs = [(n, expected[n], dtype) for n in params]
        size = write_safetensors(out / WEIGHTS, specs, ((n, t.to(dtype)) for n, t in reader), metadata={"format": "pt"})
        source = reader.describe()
        del reader  # drops the memory maps of the checkpoint files
        sha = _hash(out / WEIGHTS)
        version = f"v{src.step:08d}-{sha[:8]}"
        uri = join_uri(e.out, name, version)
        world = int(meta.get("world_size", 1))
        facts = CardFacts(
            name=name, version=version, uri=uri, encoder=e.weights, dtype=e.dtype, weights_source=f"`{PREFIXES[e.weights]}*`, {source}",
            architecture=network, timm_architecture=arch, model_args=model_args, num_features=int(net.num_features),
            num_params=sum(torch.Size(s).numel() for s in expected.values()), image_size=train_cfg.data.image_size,
            step=src.step, planned_steps=train_cfg.train.steps, world_size=world,
            samples_seen=src.step * train_cfg.data.batch_size * train_cfg.train.grad_accum * world,
            run_id=str(meta.get("run_id", "")), checkpoint=src.uri, data_shards=train_cfg.data.shards,
            data_index_sha256=meta.get("data_index_sha256"), inputs_sha256=meta.get("inputs_sha256"),
            m3i_version_train=str(meta.get("m3i_version", "unknown")), m3i_version_export=__version__,
            code_revision_train=meta.get("code_revision"), code_revision_export=code_revision(),
            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), weights_sha256=sha,
            train_config=meta["config"], evaluation=evaluation, evaluation_source=e.metrics,
            history_steps=len(history), init_from=meta.get("init_from"),
        )
        if history:
            (out / HISTORY_FILE).write_text(render_history(history))
        hashes = _write_beside(out, facts, timm_config(arch, model_args, facts.num_features, facts.image_size, network), sha)
        store = _publish(out, uri, hashes, facts)
    seconds = time.monotonic() - t0
    log.info("export: %s (%s) written in %.1fs", uri, described, seconds)
    return ExportResult(
        uri=uri, weights=store.url(WEIGHTS), config=store.url(CONFIG), card=store.url(CARD),
        sums=store.url(SUMS), manifest=store.url(MANIFEST), name=name, version=version, step=src.step,
        checkpoint=src.uri, encoder=e.weights, dtype=e.dtype, sha256=sha, bytes=size, architecture=network, seconds=seconds,
        history=store.url(HISTORY_FILE) if history else None, timm_architecture=arch,
    )


def _write_beside(out: Path, facts: CardFacts, config: dict[str, Any], weights_sha: str) -> dict[str, str]:
    """``config.json``, ``README.md`` and ``SHA256SUMS`` next to the weights (and the history, if
    written already); returns every file's sha256."""
    (out / CONFIG).write_text(_json(config))
    (out / CARD).write_text(render_card(facts))
    hashes = {WEIGHTS: weights_sha, CONFIG: _hash(out / CONFIG), CARD: _hash(out / CARD)}
    if (out / HISTORY_FILE).exists():
        hashes[HISTORY_FILE] = _hash(out / HISTORY_FILE)
    (out / SUMS).write_text(render_sums(hashes))
    hashes[SUMS] = _hash(out / SUMS)
    return hashes


def _publish(out: Path, uri: str, hashes: dict[str, str], f: CardFacts) -> Store:
    """Upload the files, then the manifest that makes them an export (readers trust only what it lists)."""
    store = open_store(uri)
    for key in hashes:
        store.put_file(key, str(out / key), {"sha256": hashes[key]})
    by_folder, _ = load_call("<local copy of this folder>", f.constructor, f.model_args, f.image_size)
    store.write_manifest(
        MANIFEST,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": f.name,
            "version": f.version,
            "architecture": f.architecture,
            "timm_architecture": f.constructor,
            "model_args": f.model_args,
            "image_size": f.image_size,
            "encoder": f.encoder,
            "dtype": f.dtype,
            "step": f.step,
            "checkpoint": f.checkpoint,
            "run_id": f.run_id,
            "data_shards": f.data_shards,
            "data_index_sha256": f.data_index_sha256,
            "inputs_sha256": f.inputs_sha256,
            "m3i_version": f.m3i_version_export,
            "code_revision": f.code_revision_export,
            "code_revision_train": f.code_revision_train,
            "evaluation": f.evaluation,
            "init_from": f.init_from,
            "history_steps": f.history_steps,
            "created": f.created,
            "load": by_folder,
            "files": [{"key": k, "bytes": (out / k).stat().st_size, "sha256": hashes[k]} for k in sorted(hashes)],
        },
    )
    return store


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"
