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
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from m3i.shard.sources import BadInput, InputItem
from m3i.storage import Store, StorageError, open_store

__all__ = ["IMAGE_MEMBERS", "expand", "discover_tars", "read_members", "scan"]

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
# Text members are small in every layout we know; a larger one is a broken sample, not a caption.
MAX_TEXT_BYTES = 1 << 20
SCAN_FORMAT = 1
SCAN_PREFIX = "_progress/tars"


def expand(patterns: tuple[str, ...]) -> list[str]:
    """Every tar URL the patterns name (brace patterns like ``data-{00000..00099}.tar``), in order, once."""
    urls: list[str] = []
    for pattern in patterns:
        urls.extend(expand_urls(pattern))
    return list(dict.fromkeys(urls))


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


def _text(f: BinaryIO | None, size: int) -> str | None:
    if f is None or size > MAX_TEXT_BYTES:
        return None
    return f.read().decode("utf-8", errors="replace")


def scan(stream: BinaryIO, tar_name: str) -> tuple[list[dict], list[BadInput]]:
    """List the samples of one tar: ``{key, image, size, label, caption}`` each, plus its bad samples.

    Reads the tar as a stream, keeping only the text members' contents.
    """
    samples: dict[str, dict] = {}
    bad: list[BadInput] = []
    members = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                members += 1
                base, ext = base_plus_ext(info.name)
                if base is None:
                    continue
                s = samples.setdefault(base, {"key": base, "members": []})
                ext = ext.lower()
                s["members"].append(ext)
                if ext in IMAGE_MEMBERS and "image" not in s:
                    s["image"], s["size"] = info.name, info.size
                elif ext in ("cls", "txt", "json"):
                    s[ext] = _text(tar.extractfile(info), info.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        # Samples listed before the damage stay; one whose image was cut off fails its decode later.
        reason = "truncated tar" if isinstance(e, (EOFError, tarfile.ReadError)) else "unreadable tar"
        bad.append(BadInput("webdataset", tar_name, f"{reason} after {members} members"))
    out = []
    for s in samples.values():
        sid = f"{tar_name}:{s['key']}"
        if "image" not in s:
            has = ", ".join(sorted(set(s["members"])))
            bad.append(BadInput("webdataset", sid, f"no image member (has {has})"))
            continue
        label = (s.get("cls") or "").strip() or None
        caption = (s.get("txt") or "").strip() or None
        if caption is None and s.get("json"):
            try:
                meta = json.loads(s["json"])
            except json.JSONDecodeError:
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                caption = meta["caption"].strip() or None
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


def discover_tars(patterns: tuple[str, ...], items: list[InputItem], bad: list[BadInput], cache: Store | None) -> set[str]:
    """Add the samples of every tar the patterns name to ``items`` (bad ones to ``bad``); returns their class names.

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


def read_members(url: str, wanted: set[str]) -> Iterator[tuple[str, bytes | OSError]]:
    """(member name, bytes) for each wanted member of the tar at ``url``, in tar order, in one pass.

    A member the tar ends before, or cannot give, comes back as an ``OSError`` in place of bytes;
    members never found are not yielded (the caller lists them as missing).
    """
    store, key = _locate(url)
    found = 0
    try:
        with store.open_read(key) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if info.name not in wanted:
                    continue
                found += 1
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError):
                    yield info.name, OSError("truncated image")
                    return
                if len(data) != info.size:
                    yield info.name, OSError("truncated image")
                    return
                yield info.name, data
                if found == len(wanted):
                    return
    except (tarfile.TarError, EOFError) as e:
        log.warning("shard: %s ends early after %d wanted members (%s)", _tar_id(url), found, type(e).__name__)
