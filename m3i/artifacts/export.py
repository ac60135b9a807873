"""An exported model: the files ``m3i export`` writes under ``<export.out>/<name>/<version>``, and their readers.

    config = read_exported_config("s3://m3i/models/m3i-demo/v00000500-1a2b3c4d")   # timm's config.json
    doc, raw = read_export_manifest(store)                                           # export.json, checked
    state = read_exported_weights(store)                                             # model.safetensors, checked

Layout of a version folder (``v<step:08d>-<first 8 hex of the weights' sha256>``)::

    model.safetensors   the encoder's state dict with timm's key names (``backbone.`` stripped)
    config.json         timm's hub config: architecture (timm's constructor), model_args, preprocessing,
                        and m3i_architecture (what the network is: ``vit_w96_d4_h3_p8_32``)
    README.md           the model card
    history.jsonl       the run's per-step loss curves up to the exported step (when the run has them)
    SHA256SUMS          sha256 of the files above
    export.json         the manifest, written LAST: every file with bytes and sha256, and the provenance

The writer is :func:`m3i.export.export`.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

from m3i.artifacts.errors import damaged, first_line
from m3i.storage import Store, open_store

if TYPE_CHECKING:
    import torch

__all__ = [
    "CARD", "CONFIG", "FORMAT", "FORMAT_VERSION", "MANIFEST", "PREFIXES", "SUMS", "WEIGHTS",
    "is_export", "listed_files", "read_export_manifest", "read_exported_config", "read_exported_weights",
]

MANIFEST = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
SUMS = "SHA256SUMS"
FORMAT = "m3i-export"
FORMAT_VERSION = 2
"""2: ``architecture`` names the network and ``timm_architecture`` is timm's constructor; in 1
``architecture`` was the constructor (``vit_tiny_patch16_224`` for a 96-wide, patch-8 ViT)."""
PREFIXES = {"online": "backbone.", "ema": "target.backbone."}
"""Where each encoder lives in the M3I module's state dict."""


def is_export(store: Store) -> bool:
    """Whether ``store`` is rooted at an exported model (its ``config.json`` and ``model.safetensors``)."""
    return store.exists(CONFIG) and store.exists(WEIGHTS)


def read_exported_config(uri: str) -> dict[str, Any]:
    """``config.json`` of an exported model folder (local or ``s3://``).

    Raises:
        StorageError: When it is missing or not JSON.
        ValueError: When it has no ``architecture``.
    """
    store = open_store(uri)
    config = store.read_json(CONFIG)
    if not isinstance(config, dict) or not config.get("architecture"):
        raise ValueError(f"{store.url(CONFIG)} names no 'architecture'; is {uri!r} an `m3i export` folder?")
    return config


def read_export_manifest(store: Store) -> tuple[dict[str, Any], bytes]:
    """``export.json`` of the export at ``store``'s root: the parsed document and its bytes (to hash).

    Raises:
        StorageError: When it is missing or storage fails after retries.
        ValueError: When it is not JSON or not an ``m3i export`` manifest.
    """
    raw = store.get_bytes(MANIFEST)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{store.url(MANIFEST)} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{store.url(MANIFEST)} is not an `m3i export` manifest (format {FORMAT!r})")
    return doc, raw


def listed_files(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {"key", "bytes", "sha256"}}`` of the files an ``export.json`` lists."""
    return {f["key"]: f for f in doc.get("files") or [] if isinstance(f, dict) and "key" in f}


def read_exported_weights(store: Store, manifest: Mapping[str, Any] | None = None) -> dict[str, "torch.Tensor"]:
    """The tensors of ``model.safetensors`` at ``store``'s root, as saved (no dtype change).

    When ``manifest`` (the export's ``export.json``) lists the file, its size and sha256 must match.

    Raises:
        StorageError: When the file is missing or storage fails after retries.
        DamagedArtifactError: When the bytes are not the ones ``export.json`` lists, or not a
            safetensors file (truncated, replaced).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    data = store.get_bytes(WEIGHTS)
    way_out = "export the checkpoint again, or copy the version folder from where it is intact"
    entry = listed_files(manifest or {}).get(WEIGHTS)
    if entry is not None:
        if isinstance(entry.get("bytes"), int) and entry["bytes"] != len(data):
            raise damaged("exported model", store.uri, f"{WEIGHTS} has {len(data)} bytes, {MANIFEST} lists {entry['bytes']}", way_out)
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise damaged("exported model", store.uri, f"{WEIGHTS} does not have the sha256 {MANIFEST} lists", way_out)
    try:
        return load_safetensors(data)
    except SafetensorError as e:
        raise damaged("exported model", store.uri, f"{WEIGHTS} is not a readable safetensors file ({first_line(e)})", way_out) from None
