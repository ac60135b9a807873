"""The folder sources: labelled class folders (``root/<class>/<image>``) and unlabelled folders of images.

Listing never reads image bytes and turns every problem it can see into a
:class:`~m3i.shard.inputs.BadInput` instead of an exception: a symlink that loops, dangles or leaves
its folder, anything that is not a regular file (FIFO, device, socket, directory), a file over
``shard.max_input_bytes``, and a name that is not valid UTF-8 (listed with
:func:`m3i.shard.files.printable`). Caption files are :mod:`m3i.shard.captions`, WebDataset tars
:mod:`m3i.shard.tars`; :func:`m3i.shard.plan.discover` lists every source.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from m3i.shard.files import file_problem, printable, valid_text
from m3i.shard.inputs import IMAGE_EXTENSIONS, BadInput, InputItem

__all__ = ["add_class_folders", "add_unlabelled", "link_problem"]

log = logging.getLogger(__name__)


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


def add_class_folders(kind: str, root: str, split: str, items: list[InputItem], bad: list[BadInput], cap: int) -> set[str]:
    """Add the images of the class folders under ``root`` to ``items`` (bad ones to ``bad``); returns their class names.

    Args:
        kind: The config key that named ``root`` (``labelled`` or ``eval_labelled``), for messages.
        root: A folder of class sub-folders.
        split: ``train`` or ``eval``.
        items: Where the samples go.
        bad: Where the bad inputs go.
        cap: Files larger than this many bytes are bad inputs.

    Raises:
        ValueError: ``root`` is not a folder, or has no class sub-folders.
    """
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


def add_unlabelled(root: str, items: list[InputItem], bad: list[BadInput], cap: int) -> None:
    """Add the images under the folder ``root`` to ``items`` (split ``train``) and its bad inputs to ``bad``.

    Raises:
        ValueError: ``root`` is not a folder.
    """
    base = _require_dir("unlabelled", root)
    prefix = printable(base.name)
    for path, rel, size in _walk_images(base, "unlabelled", prefix, bad, cap):
        items.append(InputItem("unlabelled", f"{prefix}/{rel}", path, "train", size=size))
