"""A lean streaming reader of WebDataset tars: samples grouped by key, one pass, no seeks.

Python's ``tarfile`` builds a ``TarInfo`` per member through a dozen attribute parsers
and webdataset wraps it in three generator layers; at the loader's sample sizes (a few
KB of JPEG) that cost as much as decoding the image. This reader parses only what a
shard needs (name, size, type), checks each header's checksum, and reads each member
with two ``read`` calls. It keeps webdataset's rules for grouping members into samples:
the key is the name up to the first dot of its last component, extensions are
lower-cased, ``__meta__``-style names are skipped, and a repeated extension is an error.

Handled formats: ustar (with its name prefix), POSIX pax extended headers (``path``,
``size``), GNU long names; other member types (directories, links) are skipped.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO, Iterator

__all__ = ["TarFormatError", "iter_samples"]

BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


class TarFormatError(OSError):
    """The stream is not a well-formed tar: a short member, a bad header checksum or field."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream (raw streams may return short reads)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or base-256 (GNU) for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad number field {bytes(field)!r} in tar header") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    # The checksum counts its own 8 bytes as spaces; some writers used signed bytes. Headers
    # are mostly NULs, and summing only the rest is several times faster in Python.
    unsigned = sum(header.translate(None, b"\0")) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    high = sum(1 for b in header[:148] + header[156:] if b > 127)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[str, str]:
    """``length key=value\\n`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("bad pax extended header record") from None
        if length <= 0:
            raise TarFormatError("bad pax extended header record length")
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, content) of every regular member, in archive order.

    Raises:
        TarFormatError: A truncated member or header, or a header that fails its checksum.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, BLOCK)
        if not header:
            return  # no end-of-archive blocks: the caller compares counts with the index
        if len(header) < BLOCK:
            raise TarFormatError(f"truncated tar header ({len(header)} of {BLOCK} bytes)")
        if header.count(0) == BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(header):
            if header[:2] == b"\x1f\x8b":
                raise TarFormatError("a gzip-compressed tar; shards are plain tars (m3i shard writes them so)")
            raise TarFormatError("tar header checksum mismatch")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        if size < 0:
            raise TarFormatError(f"negative member size {size} in tar header")
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(stream, padded)
        if len(data) < padded:
            raise TarFormatError(f"truncated tar member ({len(data)} of {padded} bytes)")
        if padded != size:
            data = data[:size]
        if kind in (b"x", b"X"):
            pax = _pax_records(data)
            continue
        if kind == b"g":
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\x00":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind in _REGULAR:
            yield name, data


def iter_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar: ``{"__key__", "__url__", <ext>: bytes, ...}``, in tar order.

    Args:
        stream: The tar, read sequentially from its start.
        url: Recorded as ``__url__`` and named in errors.

    Raises:
        TarFormatError: When the tar is malformed or cut short inside a member.
        ValueError: When a sample repeats a member extension.
    """
    current: dict[str, Any] | None = None
    for name, data in _members(stream):
        if name.startswith("__") and _SKIP_META.match(name):
            continue
        m = _KEY_EXT.match(name)
        if m is None:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise ValueError(f"{url}: {name}: duplicate file name in tar file ({ext})")
        current[ext] = data
    if current is not None:
        yield current
