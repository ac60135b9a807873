"""Discover raw inputs: labelled class folders, caption files (JSONL/CSV), unlabelled folders, WebDataset tars.

Discovery never reads image bytes; it lists files, parses caption files and lists tar members,
and turns every problem it can see (a caption line that does not parse, a path that does not
exist or leaves its folder, a symlink that loops) into a :class:`BadInput` instead of an exception.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "InputItem", "BadInput", "Discovery", "caption_rows", "discover", "link_problem"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCES = ("labelled", "captioned", "unlabelled")


@dataclass(frozen=True)
class InputItem:
    """One raw sample to shard."""

    source: str
    """``labelled``, ``captioned`` or ``unlabelled``."""
    id: str
    """Original id: the path relative to its source root (or caption file line)."""
    path: str
    """Absolute path of the image file."""
    split: str
    """``train`` or ``eval``."""
    label: str | None = None
    """Class name, for labelled samples."""
    caption: str | None = None
    """Caption, for image-text samples."""
    size: int = 0
    """File size in bytes at discovery (part of the plan hash, to notice changed inputs)."""
    member: str | None = None
    """For a sample of an existing WebDataset tar (``path`` is then the tar's URL): the image member's name."""
    version: str = ""
    """For a tar member: the tar's ETag or ``<mtime_ns>-<size>`` (part of the plan hash)."""

    @property
    def key(self) -> str:
        """The WebDataset sample key: stable, unique per (source, id), no dots."""
        return f"{self.source}_{hashlib.sha1(f'{self.source}/{self.id}'.encode()).hexdigest()[:20]}"


@dataclass(frozen=True)
class BadInput:
    """An input that was skipped, and why."""

    source: str
    id: str
    reason: str


@dataclass
class Discovery:
    items: list[InputItem]
    bad: list[BadInput]
    classes: list[str]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def link_problem(path: Path, root: Path) -> str | None:
    """Why ``path`` (under the resolved folder ``root``) cannot be read as an input, or None if it can.

    A symlink that loops or dangles, or that resolves outside ``root``, is a bad input to skip
    and list, not an error that ends the run (and not a way to read files the inputs do not hold).
    """
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if path.is_symlink():
            return "dangling symlink"
        return f"unreadable ({e.strerror or type(e).__name__})"
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        return "symlink leads outside the input folder"
    return None


def _walk_images(root: Path, source: str, id_prefix: str, bad: list[BadInput]) -> list[tuple[str, str, int]]:
    """``(path, path relative to root, size)`` of every image file under ``root``, sorted by relative path.

    One ``scandir`` per folder and one ``stat`` per file (listing is on the shard run's critical
    path); bad symlinks go to ``bad``; symlinked folders are not followed.
    """
    out = []
    real_root = root.resolve()
    stack = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                r = f"{rel}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, r + "/"))
                elif _is_image(e.name):
                    if e.is_symlink():
                        problem = link_problem(Path(e.path), real_root)
                        if problem is not None:
                            bad.append(BadInput(source, f"{id_prefix}/{r}", problem))
                            continue
                        size = os.stat(e.path).st_size
                    else:
                        size = e.stat(follow_symlinks=False).st_size
                    out.append((e.path, r, size))
    return sorted(out, key=lambda t: t[1])


def _require_dir(kind: str, root: str) -> Path:
    p = Path(root).expanduser()
    if not p.is_dir():
        raise ValueError(f"shard.{kind}={root!r} is not a folder")
    return p.resolve()


def _class_folders(kind: str, root: str, split: str, items: list[InputItem], bad: list[BadInput]) -> set[str]:
    base = _require_dir(kind, root)
    classes = set()
    subdirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise ValueError(f"shard.{kind}={root!r} has no class sub-folders (expected root/<class>/<image>)")
    for d in subdirs:
        problem = link_problem(d, base)
        if problem is not None:
            bad.append(BadInput("labelled", f"{base.name}/{d.name}", problem))
            continue
        classes.add(d.name)
        for path, rel, size in _walk_images(d, "labelled", f"{base.name}/{d.name}", bad):
            items.append(InputItem("labelled", f"{base.name}/{d.name}/{rel}", path, split, label=d.name, size=size))
    return classes


def caption_rows(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, row or None, error or None) for each non-empty row of a JSONL or CSV file."""
    rows: list[tuple[int, dict | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise ValueError(f"shard.captions={str(path)!r}: a CSV needs a header with 'image' and 'caption' columns")
            for i, row in enumerate(reader, start=2):
                rows.append((i, row, None))
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((i, None, f"line {i} is not JSON: {e.msg}"))
                continue
            if not isinstance(row, dict):
                rows.append((i, None, f"line {i} is not a JSON object"))
                continue
            rows.append((i, row, None))
    return rows


def _captions(root: str, items: list[InputItem], bad: list[BadInput], allow_outside: bool) -> None:
    path = Path(root).expanduser()
    if not path.is_file():
        raise ValueError(f"shard.captions={root!r} is not a file")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"shard.captions={root!r} must be a .jsonl or .csv file")
    path = path.resolve()
    for line, row, err in caption_rows(path):
        rid = f"{path.name}:{line}"
        if err is not None:
            bad.append(BadInput("captioned", rid, err))
            continue
        image = row.get("image")
        caption = row.get("caption", row.get("text"))
        if not isinstance(image, str) or not image:
            bad.append(BadInput("captioned", rid, f"line {line} has no 'image' path"))
            continue
        if not isinstance(caption, str) or not caption.strip():
            bad.append(BadInput("captioned", rid, f"line {line} has no 'caption' text"))
            continue
        named = path.parent / image  # an absolute `image` stays absolute
        problem = link_problem(named, Path(named.anchor))
        if problem is not None:
            bad.append(BadInput("captioned", rid, f"missing file {image}" if problem.startswith("unreadable") else problem))
            continue
        img = named.resolve()
        # A caption file names images next to it; a path that climbs out (or is absolute) could make
        # the shards carry any file this process can read, so it is refused unless allowed.
        if not allow_outside and not img.is_relative_to(path.parent):
            bad.append(BadInput("captioned", rid, "image path leads outside the caption file's folder (see shard.allow_outside_paths)"))
            continue
        if not img.is_file():
            bad.append(BadInput("captioned", rid, f"not a file: {image}"))
            continue
        items.append(
            InputItem("captioned", f"{path.name}/{image}", str(img), "train", caption=caption.strip(), size=img.stat().st_size)
        )


def _unlabelled(root: str, items: list[InputItem], bad: list[BadInput]) -> None:
    base = _require_dir("unlabelled", root)
    for path, rel, size in _walk_images(base, "unlabelled", base.name, bad):
        items.append(InputItem("unlabelled", f"{base.name}/{rel}", path, "train", size=size))


def discover(
    labelled: tuple[str, ...] = (),
    captions: tuple[str, ...] = (),
    unlabelled: tuple[str, ...] = (),
    eval_labelled: tuple[str, ...] = (),
    webdataset: tuple[str, ...] = (),
    *,
    allow_outside_paths: bool = False,
    scan_cache=None,
) -> Discovery:
    """List every input of every source.

    Args:
        labelled: Folders of class sub-folders (train split).
        captions: JSONL or CSV files of image path and caption.
        unlabelled: Folders of images.
        eval_labelled: Folders of class sub-folders for the held-out ``eval`` split.
        webdataset: Existing WebDataset tars: local paths or ``s3://`` URLs, brace patterns allowed.
        allow_outside_paths: Let caption files name images outside their own folder.
        scan_cache: A store where tar listings are cached (``m3i.shard.tars.scan``), or None.

    Returns:
        The items (deduplicated by (source, id)), the bad inputs, and the sorted class names.

    Raises:
        ValueError: When a named folder or file does not exist or has the wrong layout, or
            when no input is given at all.
    """
    if not (labelled or captions or unlabelled or eval_labelled or webdataset):
        raise ValueError(
            "shard: no inputs; set at least one of shard.labelled, shard.captions, shard.unlabelled, shard.webdataset"
        )
    items: list[InputItem] = []
    bad: list[BadInput] = []
    classes: set[str] = set()
    for root in labelled:
        classes |= _class_folders("labelled", root, "train", items, bad)
    for root in eval_labelled:
        classes |= _class_folders("eval_labelled", root, "eval", items, bad)
    for root in captions:
        _captions(root, items, bad, allow_outside_paths)
    for root in unlabelled:
        _unlabelled(root, items, bad)
    if webdataset:
        from m3i.shard.tars import discover_tars

        classes |= discover_tars(webdataset, items, bad, scan_cache)
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for it in items:
        k = (it.split, it.source, it.id)
        if k in seen:
            bad.append(BadInput(it.source, it.id, "duplicate input"))
            continue
        seen.add(k)
        unique.append(it)
    return Discovery(unique, bad, sorted(classes))
