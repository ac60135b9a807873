"""Turn one raw input into the bytes of one WebDataset sample."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from m3i.shard.sources import InputItem

__all__ = ["EncodeOptions", "encode_sample", "tar_bytes"]

# Pillow refuses absurdly large images (decompression bombs) with a warning; make it an error.
Image.MAX_IMAGE_PIXELS = 200_000_000


@dataclass(frozen=True)
class EncodeOptions:
    resize: int | None
    reencode: bool
    jpeg_quality: int


def tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus padded content."""
    total = 0
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        total += 512 + -(-len(v) // 512) * 512
    return total


def encode_sample(item: InputItem, class_index: dict[str, int], opts: EncodeOptions) -> dict[str, Any]:
    """Read, check and (re-)encode one input.

    JPEG inputs are copied byte for byte unless a resize or ``reencode`` asks otherwise;
    every other format is encoded to JPEG. Every image is fully decoded once, so a
    truncated or corrupt file is caught here rather than in training.

    Returns:
        A WebDataset sample: ``__key__``, ``jpg`` and ``json`` bytes, plus ``cls`` and ``txt``.

    Raises:
        OSError: The file is missing or unreadable, or the image does not decode.
    """
    try:
        with open(item.path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"unreadable: {type(e).__name__}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt = img.format
            img.load()  # a full decode: catches truncated and corrupt data
            w, h = img.size
            needs_resize = opts.resize is not None and min(w, h) > opts.resize
            if fmt == "JPEG" and not needs_resize and not opts.reencode and img.mode in ("RGB", "L"):
                data = raw
            else:
                out = img.convert("RGB")
                if needs_resize:
                    scale = opts.resize / min(w, h)
                    out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
                w, h = out.size
                buf = io.BytesIO()
                out.save(buf, format="JPEG", quality=opts.jpeg_quality)
                data = buf.getvalue()
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError, OSError) as e:
        raise OSError(f"undecodable image: {type(e).__name__}: {e}") from None
    meta = {"source": item.source, "id": item.id, "width": w, "height": h}
    sample: dict[str, Any] = {"__key__": item.key, "jpg": data}
    if item.label is not None:
        meta["class_name"] = item.label
        sample["cls"] = str(class_index[item.label]).encode()
    if item.caption is not None:
        sample["txt"] = item.caption.encode("utf-8")
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample
