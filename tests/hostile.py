"""Hostile `m3i shard` inputs for the fault and fuzz tests: tar members of every kind, odd files, a guarded CLI run."""

from __future__ import annotations

import io
import os
import resource
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

GIB = 1 << 30

# The child prints its own peak RSS, VmHWM of its own address space: getrusage's ru_maxrss would
# count the forked copy of this (larger) test process from before the exec.
_CHILD = (
    "import sys\n"
    "from m3i.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print('peak_rss_kib', hwm, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def jpeg(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def escaped(raw: bytes) -> str:
    """How m3i lists a non-UTF-8 name: its bytes, the bad ones as ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


def make_socket(path: Path) -> None:
    """A Unix socket file at ``path`` (bound, then closed: the file stays).

    Bound by its name from inside its folder: a socket address holds at most 107 bytes, less than
    a test's temporary path may take.
    """
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    try:
        os.chdir(path.parent)
        s.bind(path.name)
    finally:
        os.chdir(cwd)
        s.close()


def run_cli(args: list[str], cwd: Path, mem_bytes: int = 3 * GIB, timeout: float = 300) -> tuple[int, str, str, int]:
    """``m3i <args>`` in a child process with its data segment capped at ``mem_bytes``.

    The cap turns an unbounded read into a MemoryError instead of the whole machine's memory; the
    timeout is a hang guard only (a run that blocks forever is killed and the test fails).

    Returns:
        (exit status, stdout, stderr, peak RSS in bytes).
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (mem_bytes, mem_bytes))

    p = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=limit,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"m3i {' '.join(args)} did not end within {timeout}s (hung); stderr: {err[-2000:]}") from None
    peak = next((int(line.split()[1]) * 1024 for line in err.splitlines() if line.startswith("peak_rss_kib ")), -1)
    return p.returncode, out, err, peak


class TarBuilder:
    """A tar written member by member, with the members ``tarfile`` will not write: links, FIFOs,
    GNU sparse members declaring any size, names that are not UTF-8, two members of one name."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def _header(self, name: str, type_: bytes, size: int = 0, linkname: str = "") -> bytes:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname, info.mode, info.mtime = type_, size, linkname, 0o644, 0
        # GNU format with surrogateescape: a name that is not UTF-8 is written as its raw bytes.
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")

    def file(self, name: str, data: bytes) -> "TarBuilder":
        self.chunks += [self._header(name, tarfile.REGTYPE, len(data)), data, b"\0" * (-len(data) % 512)]
        return self

    def symlink(self, name: str, target: str) -> "TarBuilder":
        self.chunks.append(self._header(name, tarfile.SYMTYPE, linkname=target))
        return self

    def hardlink(self, name: str, target: str) -> "TarBuilder":
        self.chunks.append(self._header(name, tarfile.LNKTYPE, linkname=target))
        return self

    def fifo(self, name: str) -> "TarBuilder":
        self.chunks.append(self._header(name, tarfile.FIFOTYPE))
        return self

    def sparse(self, name: str, realsize: int, stored: bytes = b"\xff" * 512) -> "TarBuilder":
        """A GNU sparse member (type ``S``) of ``realsize`` bytes: ``stored`` at its start, a hole after.

        ``tarfile`` fills holes with zeros on read: reading it whole would allocate ``realsize`` bytes,
        while the tar holds only ``stored``.
        """
        assert len(stored) % 512 == 0
        buf = bytearray(self._header(name, tarfile.REGTYPE, len(stored)))
        buf[156:157] = tarfile.GNUTYPE_SPARSE
        # The first sparse entry at 386: (offset, numbytes); isextended at 482; realsize at 483 (base-256: any size).
        buf[386:398] = b"%011o\0" % 0
        buf[398:410] = b"%011o\0" % len(stored)
        buf[482] = 0
        buf[483:495] = _b256(realsize, 12)
        buf[148:156] = b" " * 8
        buf[148:156] = b"%06o\0 " % sum(buf)
        self.chunks += [bytes(buf), stored]
        return self

    def raw(self, data: bytes) -> "TarBuilder":
        self.chunks.append(data)
        return self

    def bytes(self, end: bool = True) -> bytes:
        body = b"".join(self.chunks) + (b"\0" * 1024 if end else b"")
        return body + b"\0" * (-len(body) % tarfile.RECORDSIZE if end else 0)

    def write(self, path: Path, end: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.bytes(end))
        return path


def _b256(n: int, width: int) -> bytes:
    """``n`` in tar's base-256 numeric form: 0x80, then big-endian bytes."""
    return bytes([0x80]) + n.to_bytes(width - 1, "big")


def mkdir_bytes(parent: Path, raw_name: bytes) -> Path:
    """A folder whose name is the raw bytes ``raw_name`` (need not be UTF-8)."""
    path = os.path.join(os.fsencode(parent), raw_name)
    os.mkdir(path)
    return Path(os.fsdecode(path))


def write_bytes_name(parent: Path, raw_name: bytes, data: bytes) -> None:
    """A file whose name is the raw bytes ``raw_name`` (need not be UTF-8)."""
    with open(os.path.join(os.fsencode(parent), raw_name), "wb") as f:
        f.write(data)
