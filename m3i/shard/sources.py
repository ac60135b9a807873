"""Discover raw inputs: labelled class folders, caption files (JSONL/CSV), unlabelled folders, WebDataset tars.

Discovery never reads image bytes; it lists files, parses caption files and lists tar members,
and turns every problem it can see into a :class:`BadInput` instead of an exception: a caption
line that does not parse or is too long, a path that does not exist, leaves its folder, holds a
NUL or names a file another row already named, a symlink that loops, anything that is not a
regular file (FIFO, device, socket, directory), a file over ``shard.max_input_bytes``, and a
name or caption that is not valid UTF-8 (listed with :func:`m3i.shard.files.printable`).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from m3i.shard.files import not_regular, printable, too_large, valid_text

__all__ = ["IMAGE_EXTENSIONS", "InputItem", "BadInput", "Discovery", "caption_rows", "discover", "file_problem", "link_problem"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCES = ("labelled", "captioned", "unlabelled")
# A caption row holds a path and a caption; a longer line is a broken row, read no further than this.
MAX_ROW_BYTES = 1 << 20
# Discovery's default when no cap is given (ShardConfig.max_input_bytes' default).
DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024


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


def file_problem(st: os.stat_result, cap: int) -> str | None:
    """Why a file of this stat cannot be an input (not regular, too large), or None."""
    if not stat.S_ISREG(st.st_mode):
        return not_regular(st.st_mode)
    if st.st_size > cap:
        return too_large(st.st_size, cap)
    return None


def _walk_images(root: Path, source: str, id_prefix: str, bad: list[BadInput], cap: int) -> list[tuple[str, str, int]]:
    """``(path, path relative to root, size)`` of every image file under ``root``, sorted by relative path.

    One ``scandir`` per folder and one ``lstat`` per file (listing is on the shard run's critical
    path). Bad symlinks, anything but a regular file, files over ``cap`` bytes and names that are
    not valid UTF-8 go to ``bad``; symlinked folders are not followed.
    """
    out = []
    real_root = root.resolve()
    stack = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError as e:
            bad.append(BadInput(source, printable(f"{id_prefix}/{rel}"), f"unreadable folder ({e.strerror or type(e).__name__})"))
            continue
        with entries:
            for e in entries:
                name = e.name
                if name.startswith("."):
                    continue
                r = rel + name
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, r + "/"))
                    continue
                if not _is_image(name):
                    continue
                if not valid_text(r):
                    bad.append(BadInput(source, printable(f"{id_prefix}/{r}"), "file name is not valid UTF-8"))
                    continue
                try:
                    if e.is_symlink():
                        problem = link_problem(Path(e.path), real_root)
                        st = os.stat(e.path) if problem is None else None
                    else:
                        st = e.stat(follow_symlinks=False)
                except OSError as err:  # gone since the folder was listed
                    problem, st = f"unreadable ({err.strerror or type(err).__name__})", None
                if st is not None:
                    problem = file_problem(st, cap)
                if problem is not None:
                    bad.append(BadInput(source, f"{id_prefix}/{r}", problem))
                    continue
                out.append((e.path, r, st.st_size))
    return sorted(out, key=lambda t: t[1])


def _require_dir(kind: str, root: str) -> Path:
    p = Path(root).expanduser()
    if not p.is_dir():
        raise ValueError(f"shard.{kind}={printable(root)!r} is not a folder")
    return p.resolve()


def _class_folders(kind: str, root: str, split: str, items: list[InputItem], bad: list[BadInput], cap: int) -> set[str]:
    base = _require_dir(kind, root)
    prefix = printable(base.name)
    classes = set()
    subdirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise ValueError(f"shard.{kind}={printable(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    for d in subdirs:
        cid = f"{prefix}/{printable(d.name)}"
        problem = link_problem(d, base)
        if problem is not None:
            bad.append(BadInput("labelled", cid, problem))
            continue
        found = _walk_images(d, "labelled", cid, bad, cap)
        if not found:
            # A class no sample carries would still take a label number and a classifier output.
            log.warning("shard: class folder %s holds no images to read; it is not counted as a class", cid)
            continue
        if not valid_text(d.name):
            bad.extend(BadInput("labelled", f"{cid}/{rel}", "class folder name is not valid UTF-8") for _p, rel, _s in found)
            continue
        classes.add(d.name)
        for path, rel, size in found:
            items.append(InputItem("labelled", f"{cid}/{rel}", path, split, label=d.name, size=size))
    return classes


def _bounded_lines(f: TextIO, limit: int, too_long: list[int]) -> Iterator[str]:
    """The lines of ``f``, none read further than ``limit`` characters.

    A longer line is skipped to its end (read in pieces, never held whole), its number appended to
    ``too_long``, and an empty line is given in its place so that line numbers stay true.
    """
    n = 0
    while line := f.readline(limit + 1):
        n += 1
        if len(line) > limit and not line.endswith("\n"):
            while (rest := f.readline(limit)) and not rest.endswith("\n"):
                pass
            too_long.append(n)
            line = "\n"
        yield line


def caption_rows(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, row or None, error or None) for each non-empty row of a JSONL or CSV file.

    A row is read no further than :data:`MAX_ROW_BYTES` characters; a longer one, a line that is not
    JSON (or nests too deeply to parse) and a CSV row the ``csv`` module refuses are errors of their row.
    """
    rows: list[tuple[int, dict | None, str | None]] = []
    too_long: list[int] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(_bounded_lines(f, MAX_ROW_BYTES, too_long))
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise ValueError(f"shard.captions={str(path)!r}: a CSV needs a header with 'image' and 'caption' columns")
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    rows.append((reader.line_num, None, f"line {reader.line_num} is not valid CSV: {e}"))
                    continue
                rows.append((reader.line_num, row, None))
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(_bounded_lines(f, MAX_ROW_BYTES, too_long), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append((i, None, f"line {i} is not JSON: {e.msg}"))
                    continue
                except (ValueError, RecursionError) as e:  # ints past Python's digit limit; deep nesting
                    rows.append((i, None, f"line {i} is not JSON: {'nested too deeply' if isinstance(e, RecursionError) else e}"))
                    continue
                if not isinstance(row, dict):
                    rows.append((i, None, f"line {i} is not a JSON object"))
                    continue
                rows.append((i, row, None))
    rows += [(n, None, f"line {n} is longer than {MAX_ROW_BYTES} characters") for n in too_long]
    return sorted(rows, key=lambda r: r[0])


def _unlabelled(root: str, items: list[InputItem], bad: list[BadInput], cap: int) -> None:
    base = _require_dir("unlabelled", root)
    prefix = printable(base.name)
    for path, rel, size in _walk_images(base, "unlabelled", prefix, bad, cap):
        items.append(InputItem("unlabelled", f"{prefix}/{rel}", path, "train", size=size))


def discover(
    labelled: tuple[str, ...] = (),
    captions: tuple[str, ...] = (),
    unlabelled: tuple[str, ...] = (),
    eval_labelled: tuple[str, ...] = (),
    webdataset: tuple[str, ...] = (),
    *,
    allow_outside_paths: bool = False,
    scan_cache=None,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
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
        max_input_bytes: Inputs larger than this are bad inputs (``shard.max_input_bytes``).

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
        classes |= _class_folders("labelled", root, "train", items, bad, max_input_bytes)
    for root in eval_labelled:
        classes |= _class_folders("eval_labelled", root, "eval", items, bad, max_input_bytes)
    if captions:
        from m3i.shard.captions import add_captions

        for root in captions:
            add_captions(root, items, bad, allow_outside_paths, max_input_bytes)
    for root in unlabelled:
        _unlabelled(root, items, bad, max_input_bytes)
    if webdataset:
        from m3i.shard.tars import discover_tars

        classes |= discover_tars(webdataset, items, bad, scan_cache, max_input_bytes)
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
