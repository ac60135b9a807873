"""Reading one input: regular files only, never more bytes than a cap, odd names rendered stably;
and writes that name their path when they fail.

Every reason here is a short phrase that names the cause in words and is the same on every run,
because the index lists it (``BadInput.reason``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Iterator

__all__ = ["file_kind", "file_problem", "naming", "not_regular", "printable", "read_regular", "too_large", "valid_text"]

# O_NONBLOCK: opening a FIFO that a check let through (it was swapped in after the listing) returns at
# once instead of waiting for a writer; O_NOCTTY: a terminal never becomes this process's.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symlink"),
)


def file_kind(mode: int) -> str:
    """``regular file``, ``directory``, ``FIFO``, ``character device``, ... for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "unknown file type")


def not_regular(mode: int) -> str:
    """The reason an input of ``st_mode`` is refused, e.g. ``not a regular file (FIFO)``."""
    return f"not a regular file ({file_kind(mode)})"


def too_large(size: int, cap: int) -> str:
    """The reason an input of ``size`` bytes is refused under ``shard.max_input_bytes=cap``."""
    return f"too large ({size} bytes > shard.max_input_bytes={cap})"


def file_problem(st: os.stat_result, cap: int) -> str | None:
    """Why a file of this stat cannot be an input (not regular, too large), or None."""
    if not stat.S_ISREG(st.st_mode):
        return not_regular(st.st_mode)
    if st.st_size > cap:
        return too_large(st.st_size, cap)
    return None


def valid_text(s: str) -> bool:
    """Whether ``s`` encodes to UTF-8: no lone surrogates (from a non-UTF-8 file name or a JSON ``\\ud800``)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(s: str) -> str:
    """``s`` itself when it is valid UTF-8, else a stable ASCII-escaped rendering of it.

    A non-UTF-8 file name (held by Python as surrogate escapes) shows its bytes as ``\\xe9``; any
    other lone surrogate (e.g. from a JSON ``"\\ud800"``) shows as ``\\ud800``. The same name always
    gives the same text, so an index listing it is the same on every run.
    """
    if valid_text(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("ascii")


def read_regular(path: str, cap: int) -> bytes:
    """The bytes of the regular file at ``path``, refused unread when it is something else or larger than ``cap``.

    The kind is checked before opening (opening a device can have effects of its own) and again on
    the open file (a swap in between); the size is checked before a byte is read, and the read asks
    for at most that size plus one byte, so memory stays bounded whatever the file claims.

    Raises:
        OSError: With a stable reason: ``unreadable: ...``, ``not a regular file (...)``,
            ``too large (...)`` or ``file changed while it was read``.
    """
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise OSError(not_regular(mode))
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno is None:
            raise
        if e.errno == errno.ELOOP:
            raise OSError("symlink loop") from None
        raise OSError(f"unreadable: {type(e).__name__}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(not_regular(st.st_mode))
        if st.st_size > cap:
            raise OSError(too_large(st.st_size, cap))
        want = st.st_size + 1  # one byte more than the size: a file that grew is noticed, not read on
        chunks = []
        got = 0
        while got < want:
            try:
                chunk = os.read(fd, want - got)
            except OSError as e:
                raise OSError(f"unreadable: {type(e).__name__}: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got != st.st_size:
            raise OSError("file changed while it was read")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk: no copy
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Within it, an ``OSError`` raised without a file name is raised again naming ``path``, same errno.

    A full disk fails a ``write`` or ``fsync`` with ``[Errno 28] No space left on device`` and no
    name; which file, and so which disk, is what the person reading it needs.
    """
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from e
        raise
