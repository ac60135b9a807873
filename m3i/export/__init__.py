"""``m3i export``: a training checkpoint -> backbone weights that plain timm loads, in object storage.

    from m3i.export import export
    result = export(cfg)              # cfg.export: checkpoint, out, name, weights (online|ema), dtype
    print(result.uri)                 # <out>/<name>/v00000500-1a2b3c4d/{model.safetensors, config.json, ...}

    # later, anywhere, without m3i (after copying the folder to local disk):
    model = timm.create_model("local-dir:/path/to/v00000500-1a2b3c4d", pretrained=True)

Reads DeepSpeed checkpoints of every ZeRO stage, world size and precision through the read layer
(:mod:`m3i.artifacts.checkpoint` finds and verifies one, :mod:`m3i.artifacts.zero` reads its
backbone; the export's file names are :mod:`m3i.artifacts.export`'s), writes the weights tensor by tensor (:mod:`m3i.export.safetensors_stream`), and puts timm's
``config.json``, a model card and ``SHA256SUMS`` beside them (:mod:`m3i.export.card`).
"""

from m3i.export.card import CardFacts, code_revision, load_call, render_card, timm_config
from m3i.export.exporter import ExportResult, export
from m3i.export.safetensors_stream import write_safetensors

__all__ = [
    "CardFacts",
    "ExportResult",
    "code_revision",
    "export",
    "load_call",
    "render_card",
    "timm_config",
    "write_safetensors",
]
