"""Turn one raw input into the bytes of one WebDataset sample."""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from m3i.shard.sources import InputItem

__all__ = ["EncodeOptions", "decode_reason", "encode_sample", "tar_bytes"]

# Pillow refuses absurdly large images (decompression bombs) with a warning; make it an error.
Image.MAX_IMAGE_PIXELS = 200_000_000


_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")
# PIL puts object reprs in some messages ("<_io.BytesIO object at 0x7f...>", file handles); they
# differ from run to run, so every <...> repr and every bare address goes.
_REPR = re.compile(r"\s*(<[^<>]*>|\bat 0x[0-9a-fA-F]+|\b0x[0-9a-fA-F]+)")


def decode_reason(e: BaseException) -> str:
    """A short reason, stable from run to run, for an image PIL could not decode.

    The index lists these reasons, so they name the cause in words and carry no object addresses
    or exception class names: the same inputs give a byte-identical index on every run.
    """
    if isinstance(e, UnidentifiedImageError):
        return "not an image (PIL cannot identify it)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # PIL's own message gives twice the limit for the error and the limit for the warning; name the one set.
        m = _BOMB.search(str(e))
        limit = Image.MAX_IMAGE_PIXELS
        return f"too large ({m.group(1)} pixels > limit {limit})" if m else f"too large (over {limit} pixels)"
    text = _REPR.sub("", str(e)).strip().rstrip(".")
    if isinstance(e, OSError) and "truncated" in text.lower():
        return "truncated image"
    return f"corrupt image ({text})" if text else "corrupt image"


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
        with warnings.catch_warnings():
            # PIL only warns below twice MAX_IMAGE_PIXELS; an image that big is refused all the same.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
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
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError, ValueError, OSError) as e:
        raise OSError(f"undecodable image: {decode_reason(e)}") from None
    meta = {"source": item.source, "id": item.id, "width": w, "height": h}
    sample: dict[str, Any] = {"__key__": item.key, "jpg": data}
    if item.label is not None:
        meta["class_name"] = item.label
        sample["cls"] = str(class_index[item.label]).encode()
    if item.caption is not None:
        sample["txt"] = item.caption.encode("utf-8")
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample
