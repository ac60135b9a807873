"""Existing WebDataset tars as inputs (img2dataset, DataComp, LAION-style ``{key}.jpg`` + ``.txt``/``.json``/``.cls``).

A tar input is listed once (member names, sizes and the small text members; image bytes are
skipped), and that listing is cached next to the output keyed by the tar's URL and ETag, so a
re-run does not read it again. Each sample of the listing becomes an :class:`InputItem` of one
source, chosen by what the sample carries:

- a ``cls`` member -> ``labelled`` (its text is the class name, e.g. ``"7"``);
- else a ``txt`` member, or a ``caption`` field in its ``json`` -> ``captioned``;
- else -> ``unlabelled``.

A sample without an image member (``jpg``, ``jpeg``, ``png``, ``webp``), or a tar that ends early,
is a bad input listed in the index like any other. The images themselves are read and checked by
the shard workers (:func:`read_members`), one pass over each tar per unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

# webdataset's own brace expander. webdataset itself is not imported here: it imports torch, which
# would cost every shard process (and every worker it forks) about 3 s and 450 MB it never uses.
from braceexpand import braceexpand

from m3i.shard.files import printable, too_large, valid_text
from m3i.shard.inputs import DEFAULT_MAX_INPUT_BYTES, BadInput, InputItem
from m3i.storage import Store, StorageError, open_store

__all__ = ["IMAGE_MEMBERS", "expand", "discover_tars", "read_members", "scan"]

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
# Text members are small in every layout we know; a larger one is a broken sample, not a caption.
MAX_TEXT_BYTES = 1 << 20
# pax and GNU long-name headers hold a few names and numbers; a larger one is an attack or damage.
MAX_HEADER_BYTES = 1 << 20
# 2: link, special-file, duplicate and non-UTF-8 members and over-size text members are listed.
SCAN_FORMAT = 2
SCAN_PREFIX = "_progress/tars"


_ENV = re.compile(r"\$\{(\w+)\}")
# The sample key and extensions of a member name, as webdataset splits them: "a/b.c.jpg" -> ("a/b", "c.jpg").
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _env(m: re.Match) -> str:
    name = "WDS_" + m.group(1)
    if name not in os.environ:
        raise ValueError(f"shard.webdataset: ${{{m.group(1)}}} needs the environment variable {name}")
    return os.environ[name]


def expand(patterns: tuple[str, ...]) -> list[str]:
    """Every tar URL the patterns name, in order, once: what ``webdataset.shardlists.expand_urls`` gives
    (``::``-separated lists, ``${X}`` from ``$WDS_X``, brace patterns like ``data-{00000..00099}.tar``)."""
    urls: list[str] = []
    for pattern in patterns:
        for url in pattern.split("::"):
            for _ in range(10):  # nested ${...}, as webdataset allows
                url, n = _ENV.subn(_env, url)
                if not n:
                    break
            urls.extend(braceexpand(url))
    return list(dict.fromkeys(urls))


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """(sample key, extensions) of a member name, or (None, None) where it has no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _locate(url: str) -> tuple[Store, str]:
    """(store of the tar's folder, key of the tar) for a local path or an ``s3://`` URL."""
    if url.startswith("s3://"):
        parent, _, name = url.rstrip("/").rpartition("/")
        if not name or parent == "s3:/":
            raise ValueError(f"shard.webdataset={url!r} names a bucket, not a tar")
        return open_store(parent), name
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ValueError(f"shard.webdataset={url!r} is not a file")
    return open_store(str(path.parent.resolve())), path.name


class _OversizeHeader(tarfile.ReadError):
    """A pax or GNU long-name header larger than :data:`MAX_HEADER_BYTES` (not read)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that refuses extended headers (pax, GNU long names) over :data:`MAX_HEADER_BYTES`.

    ``tarfile`` reads such a header's body whole, at the size its own header claims, before any
    member is seen; a tar claiming a multi-GiB pax header would be held in memory.
    """

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED_TYPES and self.size > MAX_HEADER_BYTES:
            raise _OversizeHeader(f"extended header of {self.size} bytes > {MAX_HEADER_BYTES}")
        return super()._proc_member(tarfile_)


_EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def _open_tar(stream: BinaryIO) -> tarfile.TarFile:
    return tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a stream-mode tar, one at a time: ``tarfile`` keeps every ``TarInfo`` it reads,
    memory that grows with the tar, so each is forgotten once the next is read."""
    while (info := tar.next()) is not None:
        tar.members.clear()
        yield info


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hard link"
    if info.ischr():
        return "character device"
    if info.isblk():
        return "block device"
    if info.isfifo():
        return "FIFO"
    return f"type {info.type!r}"


def scan(stream: BinaryIO, tar_name: str) -> tuple[list[dict], list[BadInput]]:
    """List the samples of one tar: ``{key, image, size, label, caption}`` each, plus its bad samples.

    Reads the tar as a stream, keeping only the text members' contents. Link and special-file
    members, members whose names are not valid UTF-8 and second members of one name are listed
    as bad and do not touch their neighbours; a sample with a text member over
    :data:`MAX_TEXT_BYTES` or a caption that is not valid Unicode is bad as a whole.
    """
    samples: dict[str, dict] = {}
    bad: list[BadInput] = []
    members = 0
    try:
        with _open_tar(stream) as tar:
            for info in _members(tar):
                name = info.name
                if info.isdir():
                    continue
                if not valid_text(name):
                    bad.append(BadInput("webdataset", f"{tar_name}:{printable(name)}", "member name is not valid UTF-8"))
                    continue
                if not info.isreg():
                    bad.append(BadInput("webdataset", f"{tar_name}:{name}", f"not a regular file member ({_member_kind(info)})"))
                    continue
                members += 1
                base, ext = base_plus_ext(name)
                if base is None:
                    continue
                s = samples.setdefault(base, {"key": base, "members": []})
                ext = ext.lower()
                if ext in s["members"]:
                    bad.append(BadInput("webdataset", f"{tar_name}:{name}", "second member of the same name (the first is used)"))
                    continue
                s["members"].append(ext)
                if ext in IMAGE_MEMBERS and "image" not in s:
                    s["image"], s["size"] = info.name, info.size
                elif ext in ("cls", "txt", "json"):
                    if info.size > MAX_TEXT_BYTES:
                        s["problem"] = f"{ext} member too large ({info.size} bytes > {MAX_TEXT_BYTES})"
                    else:
                        s[ext] = tar.extractfile(info).read(MAX_TEXT_BYTES + 1).decode("utf-8", errors="replace")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # Samples listed before the damage stay; one whose image was cut off fails its decode later.
        if isinstance(e, _OversizeHeader):
            reason = f"damaged tar ({e})"
        else:
            reason = "truncated tar" if isinstance(e, (EOFError, tarfile.ReadError)) else "unreadable tar"
        bad.append(BadInput("webdataset", tar_name, f"{reason} after {members} members"))
    out = []
    for s in samples.values():
        sid = f"{tar_name}:{s['key']}"
        if "image" not in s:
            has = ", ".join(sorted(set(s["members"])))
            bad.append(BadInput("webdataset", sid, f"no image member (has {has})"))
            continue
        if "problem" in s:
            bad.append(BadInput("webdataset", sid, s["problem"]))
            continue
        label = (s.get("cls") or "").strip() or None
        caption = (s.get("txt") or "").strip() or None
        if caption is None and s.get("json"):
            try:
                meta = json.loads(s["json"])
            except (ValueError, RecursionError):  # not JSON, ints past Python's digit limit, deep nesting
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                caption = meta["caption"].strip() or None
        if caption is not None and not valid_text(caption):
            bad.append(BadInput("webdataset", sid, "caption is not valid Unicode (a lone surrogate)"))
            continue
        out.append({"key": s["key"], "image": s["image"], "size": s["size"], "label": label, "caption": caption})
    return out, bad


def _cached_scan(url: str, cache: Store | None) -> tuple[list[dict], list[BadInput], str]:
    store, key = _locate(url)
    info = store.stat(key)
    if info is None:
        raise ValueError(f"shard.webdataset={url!r} does not exist")
    version = info.etag or str(info.size)
    ckey = f"{SCAN_PREFIX}/{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"
    if cache is not None:
        try:
            rec = cache.read_json(ckey) if cache.exists(ckey) else None
        except (StorageError, ValueError):
            rec = None  # an unreadable cache entry only costs a re-scan
        if rec and rec.get("format") == SCAN_FORMAT and rec.get("url") == url and rec.get("version") == version:
            return rec["samples"], [BadInput(**b) for b in rec["bad"]], version
    with store.open_read(key) as f:
        samples, bad = scan(f, _tar_id(url))
    if cache is not None:
        cache.write_json(
            ckey,
            {"format": SCAN_FORMAT, "url": url, "version": version, "samples": samples, "bad": [b.__dict__ for b in bad]},
        )
    return samples, bad, version


def _tar_id(url: str) -> str:
    """``<folder>/<tar>``: names a tar in ids and reasons without its full address."""
    parts = url.rstrip("/").split("/")
    return "/".join(parts[-2:])


def discover_tars(
    patterns: tuple[str, ...], items: list[InputItem], bad: list[BadInput], cache: Store | None,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> set[str]:
    """Add the samples of every tar the patterns name to ``items`` (bad ones to ``bad``); returns their class names.

    A sample whose image member declares more than ``max_input_bytes`` is bad (never read).

    Raises:
        ValueError: A named tar does not exist, or a pattern names nothing.
    """
    classes: set[str] = set()
    urls = expand(patterns)
    if not urls:
        raise ValueError(f"shard.webdataset={list(patterns)!r} names no tar")
    for url in urls:
        samples, tar_bad, version = _cached_scan(url, cache)
        bad.extend(tar_bad)
        tid = _tar_id(url)
        for s in samples:
            if s["size"] > max_input_bytes:
                bad.append(BadInput("webdataset", f"{tid}:{s['key']}", too_large(s["size"], max_input_bytes)))
                continue
            source = "labelled" if s["label"] else "captioned" if s["caption"] else "unlabelled"
            if s["label"]:
                classes.add(s["label"])
            items.append(
                InputItem(
                    source, f"{tid}:{s['key']}", url, "train",
                    label=s["label"], caption=s["caption"] if source == "captioned" else None,
                    size=s["size"], member=s["image"], version=version,
                )
            )
    return classes


def read_members(url: str, wanted: set[str], max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> Iterator[tuple[str, bytes | OSError]]:
    """(member name, bytes) for each wanted member of the tar at ``url``, in tar order, in one pass.

    Only regular-file members are read, the first of each name, and only when the size their
    header declares is at most ``max_bytes`` (checked before a byte is read; a larger one comes
    back as an ``OSError``). A member the tar ends before, or cannot give, comes back as an
    ``OSError`` in place of bytes; members never found are not yielded (the caller lists them as missing).
    """
    store, key = _locate(url)
    done: set[str] = set()
    try:
        with store.open_read(key) as f, _open_tar(f) as tar:
            for info in _members(tar):
                if info.name not in wanted or info.name in done or not info.isreg():
                    continue
                done.add(info.name)
                if info.size > max_bytes:
                    yield info.name, OSError(too_large(info.size, max_bytes))
                else:
                    try:
                        data = tar.extractfile(info).read(info.size)
                    except (tarfile.TarError, EOFError, OSError, ValueError):
                        yield info.name, OSError("truncated image")
                        return
                    if len(data) != info.size:
                        yield info.name, OSError("truncated image")
                        return
                    yield info.name, data
                if len(done) == len(wanted):
                    return
    except (tarfile.TarError, EOFError, ValueError) as e:
        log.warning("shard: %s ends early after %d wanted members (%s)", _tar_id(url), len(done), type(e).__name__)
