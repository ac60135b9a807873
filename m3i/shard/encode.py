"""Turn one raw input into the bytes of one WebDataset sample, and write samples into a tar."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import tarfile
import warnings
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, BinaryIO, Iterator

from PIL import Image, UnidentifiedImageError

from m3i.shard.files import read_regular
from m3i.shard.inputs import DEFAULT_MAX_INPUT_BYTES, InputItem

__all__ = ["EncodeOptions", "SampleTarWriter", "decode_reason", "encode_sample", "refuse_bombs", "tar_bytes"]

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
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    """Inputs larger than this are refused before they are read (``shard.max_input_bytes``)."""


def tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus padded content."""
    total = 0
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        total += 512 + -(-len(v) // 512) * 512
    return total


# The fixed fields of every member header SampleTarWriter writes: what tarfile writes for a
# regular file of mode 0o444, uid/gid 0, user and group "bigdata", mtime 0 (webdataset.TarWriter's
# defaults with mtime=0). Offsets per POSIX ustar: name 0, mode 100, uid 108, gid 116, size 124,
# mtime 136, checksum 148, then from 156 _REST: type, linkname, magic+version, uname, gname, device, prefix.
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME0 = b"00000000000\0"
_REST = (
    b"0" + b"\0" * 100 + tarfile.POSIX_MAGIC + b"bigdata".ljust(32, b"\0") * 2
).ljust(_BLOCK - 156, b"\0")
# A header's checksum is the sum of its bytes with the checksum field read as 8 spaces.
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME0) + 8 * ord(" ") + sum(_REST)
_MAX_FAST_SIZE = 8**11  # sizes from here on need a pax header


def _member_header(name: str, size: int) -> bytes:
    """The 512-byte tar header of one sample member, as ``tarfile`` writes it in PAX format."""
    try:
        bname = name.encode("ascii")
    except UnicodeEncodeError:
        bname = b""
    if not bname or len(bname) > 100 or not 0 <= size < _MAX_FAST_SIZE:
        # Rare names and sizes (non-ASCII, long, 8 GiB and more) get tarfile's own pax header.
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    bsize = b"%011o\0" % size
    chksum = _FIXED_SUM + sum(bname) + sum(bsize)
    return b"".join((bname.ljust(100, b"\0"), _MODE_IDS, bsize, _MTIME0, b"%06o\0 " % chksum, _REST))


class SampleTarWriter:
    """Writes samples into an uncompressed tar on ``f`` and keeps the sha256 and size of what it wrote.

    The bytes are exactly those of ``webdataset.TarWriter(f, mtime=0, encoder=False)`` (members in
    key order, ``__*`` keys skipped, end blocks and padding to tar's 10 KiB record), so a shard does
    not change with the writer; ``tests/test_shard.py`` holds it to that. It builds each header
    directly instead of through ``tarfile``'s generic path, which cost more than decoding a small JPEG.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self._sha = hashlib.sha256()
        self.size = 0

    def _put(self, data: bytes) -> None:
        self.f.write(data)
        self._sha.update(data)
        self.size += len(data)

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample: a member ``<__key__>.<ext>`` per bytes value."""
        key = sample["__key__"]
        chunks = []
        for ext in sorted(sample):
            if ext[0] == "_":
                continue
            data = sample[ext]
            if not isinstance(data, (bytes, bytearray)):
                raise ValueError(f"sample {key!r}: {ext} is {type(data).__name__}, not bytes")
            n = len(data)
            chunks += (_member_header(f"{key}.{ext}", n), data, b"\0" * (-n % _BLOCK))
        self._put(b"".join(chunks))

    def close(self) -> str:
        """Write the end of the archive (not closing ``f``); returns the hex sha256 of the whole tar."""
        end = 2 * _BLOCK
        self._put(b"\0" * (end + -(self.size + end) % _RECORD))
        return self._sha.hexdigest()


@contextlib.contextmanager
def refuse_bombs() -> Iterator[None]:
    """Within it, an image over ``Image.MAX_IMAGE_PIXELS`` is refused even below twice that, where PIL only warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _meta_json(source: str, id: str, width: int, height: int, class_name: str | None) -> bytes:
    """``json.dumps(meta, sort_keys=True).encode()`` of a sample's metadata, byte for byte, at a fifth of its cost."""
    label = "" if class_name is None else f'"class_name": {_json_str(class_name)}, '
    return f'{{{label}"height": {height:d}, "id": {_json_str(id)}, "source": {_json_str(source)}, "width": {width:d}}}'.encode()


def encode_sample(
    item: InputItem, class_index: dict[str, int], opts: EncodeOptions, raw: bytes | None = None, *, bombs_refused: bool = False
) -> dict[str, Any]:
    """Read, check and (re-)encode one input.

    JPEG inputs are copied byte for byte unless a resize or ``reencode`` asks otherwise;
    every other format is encoded to JPEG. Every image is fully decoded once, so a
    truncated or corrupt file is caught here rather than in training.

    Args:
        item: The input.
        class_index: Class name -> label number.
        opts: How to encode.
        raw: The input's bytes, when the caller has them; else they are read from ``item.path``
            (a regular file of at most ``opts.max_input_bytes``, checked before reading).
        bombs_refused: The caller holds :func:`refuse_bombs` around many calls (it costs about
            as much as a tenth of a small JPEG's decode, so a worker enters it once per unit).

    Returns:
        A WebDataset sample: ``__key__``, ``jpg`` and ``json`` bytes, plus ``cls`` and ``txt``.

    Raises:
        OSError: The file is missing, unreadable, not a regular file or too large, or the image does not decode.
    """
    if raw is None:
        raw = read_regular(item.path, opts.max_input_bytes)
    try:
        with contextlib.nullcontext() if bombs_refused else refuse_bombs():
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
    sample: dict[str, Any] = {"__key__": item.key, "jpg": data}
    if item.label is not None:
        sample["cls"] = str(class_index[item.label]).encode()
    if item.caption is not None:
        sample["txt"] = item.caption.encode("utf-8")
    sample["json"] = _meta_json(item.source, item.id, w, h, item.label)
    return sample
