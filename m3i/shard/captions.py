"""The caption-file source: rows of an image path and a caption, each image found, checked and deduplicated.

Rows come from :func:`caption_rows` (bounded lines, per-row errors). Each row's
image is found with one ``realpath`` per folder the rows name and one ``lstat`` per row, kept to the
caption file's folder unless ``shard.allow_outside_paths``, refused when it is not a regular file or
larger than ``shard.max_input_bytes``, and read at most once: rows naming one file (``./img/x.jpg``,
``img/x.jpg``, a link to it) make one sample, and the later rows are listed.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from pathlib import Path
from typing import Iterator, TextIO

from m3i.shard.files import file_problem, printable, valid_text
from m3i.shard.inputs import BadInput, InputItem

__all__ = ["MAX_ROW_BYTES", "add_captions", "caption_rows"]

# A caption row holds a path and a caption; a longer line is a broken row, read no further than this.
MAX_ROW_BYTES = 1 << 20


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


class _Refused(Exception):
    """An image path of a caption row that is not read; the message is its reason."""


def _find_image(folder: str, image: str, real_folders: dict[str, str]) -> tuple[str, os.stat_result]:
    """(real path, stat) of the file a caption row names, following symlinks as the kernel would.

    One ``realpath`` per folder the rows name (cached in ``real_folders``) and one ``lstat`` per
    row: a full ``resolve()`` per row (an ``lstat`` per path component) cost more than the decode
    of a small JPEG.

    Raises:
        _Refused: The file is missing, or is a symlink that loops or dangles.
    """
    head, tail = os.path.split(image)
    if tail in ("", ".", ".."):  # names a folder: resolve it whole
        real = os.path.realpath(os.path.join(folder, image))
    else:
        real_head = real_folders.get(head)
        if real_head is None:
            real_head = real_folders[head] = os.path.realpath(os.path.join(folder, head))
        real = os.path.join(real_head, tail)
    try:
        st = os.lstat(real)
    except OSError as e:
        raise _Refused("symlink loop" if e.errno == errno.ELOOP else f"missing file {printable(image)}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(real)
        except OSError as e:
            raise _Refused("symlink loop" if e.errno == errno.ELOOP else "dangling symlink") from None
        real = os.path.realpath(real)
    return real, st


def add_captions(root: str, items: list[InputItem], bad: list[BadInput], allow_outside: bool, cap: int) -> None:
    """Add the samples of the caption file ``root`` to ``items`` and its bad rows to ``bad``.

    Args:
        root: A ``.jsonl`` or ``.csv`` file of ``image`` (path relative to the file) and ``caption``.
        items: Where the samples go.
        bad: Where the bad rows go, each with its line number and reason.
        allow_outside: Let rows name images outside the caption file's folder.
        cap: Images larger than this many bytes are bad rows.

    Raises:
        ValueError: ``root`` is not a file, or not ``.jsonl``/``.csv``, or a CSV without an ``image`` column.
    """
    path = Path(root).expanduser()
    if not path.is_file():
        raise ValueError(f"shard.captions={printable(root)!r} is not a file")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"shard.captions={printable(root)!r} must be a .jsonl or .csv file")
    path = path.resolve()
    name = printable(path.name)
    folder = str(path.parent)
    inside = folder.rstrip(os.sep) + os.sep
    real_folders: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, row, err in caption_rows(path):
        rid = f"{name}:{line}"
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
        if "\0" in image:
            bad.append(BadInput("captioned", rid, f"line {line}: the image path holds a NUL byte"))
            continue
        if not valid_text(image) or not valid_text(caption):
            what = "image path" if not valid_text(image) else "caption"
            bad.append(BadInput("captioned", rid, f"line {line}: the {what} is not valid Unicode (a lone surrogate)"))
            continue
        try:
            real, st = _find_image(folder, image, real_folders)
        except _Refused as e:
            bad.append(BadInput("captioned", rid, str(e)))
            continue
        # A caption file names images next to it; a path that climbs out (or is absolute) could make
        # the shards carry any file this process can read, so it is refused unless allowed.
        if not allow_outside and not real.startswith(inside):
            bad.append(BadInput("captioned", rid, "image path leads outside the caption file's folder (see shard.allow_outside_paths)"))
            continue
        problem = file_problem(st, cap)
        if problem is not None:
            bad.append(BadInput("captioned", rid, problem))
            continue
        # `./img/x.jpg`, `img/x.jpg` and a link to it are one file: one sample, the rest listed.
        if real in first_line:
            bad.append(BadInput("captioned", rid, f"line {line} names the same file as line {first_line[real]}"))
            continue
        first_line[real] = line
        items.append(
            InputItem("captioned", f"{name}/{os.path.normpath(image)}", real, "train", caption=caption.strip(), size=st.st_size)
        )
