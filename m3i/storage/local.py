"""A local folder as an object store (``/path`` or ``file:///path``).

A write that fails names the object's file: a full disk or quota (``ENOSPC``, ``EDQUOT``) fails
``write`` or ``fsync`` with an ``OSError`` that carries no file name, and which file, so which
disk, is what the person reading the error needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from m3i.storage.base import ObjectInfo, StorageError, Store

__all__ = ["LocalStore", "naming"]

_META_SUFFIX = ".m3i-meta.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Errnos only a write gets (no room, over quota, over the file size limit): naming the file written is right."""


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Within it, a disk-full ``OSError`` (:data:`_DISK_FULL`) raised without a file name is raised again
    naming ``path``, same errno: ``[Errno 28] No space left on device: '/data/run/x'``. Other errors pass
    as they are (a read error of a source file must not be blamed on the file written)."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno in _DISK_FULL:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


class LocalStore(Store):
    """Objects are files under ``root``; metadata lives in a hidden side file.

    Writes go to a temporary file in the same folder and are renamed into place, so
    a reader sees the whole old or the whole new object, never a partial one.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        key = key.strip("/")
        if not key or any(p in ("..", ".") for p in key.split("/")):
            raise ValueError(f"key={key!r} is not a valid object key (empty, '.' or '..' parts)")
        return self.root / key

    def _meta_path(self, key: str) -> Path:
        p = self._path(key)
        return p.with_name("." + p.name + _META_SUFFIX)

    def _atomic_write(self, path: Path, writer) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            # mkstemp makes 0600 files; objects get the usual mode under the umask, so a
            # reader running as another user (a shared volume) can read them.
            os.fchmod(fd, 0o666 & ~_UMASK)
            with naming(path), os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _write_meta(self, key: str, metadata: dict[str, str] | None) -> None:
        mp = self._meta_path(key)
        metadata = {k: v for k, v in (metadata or {}).items() if k != "content-type"}  # files have no type
        if metadata:
            self._atomic_write(mp, lambda f: f.write(json.dumps(metadata).encode()))
        else:
            mp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        self._write_meta(key, metadata)
        self._atomic_write(self._path(key), lambda f: f.write(data))

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        # The whole object is written to a temp file first and hard-linked into place: link(2) fails
        # with EEXIST when the name exists, atomically (NFS included), and a reader never sees part
        # of the object, which O_CREAT|O_EXCL followed by a write would show.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            with naming(path), os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:
                raise StorageError(
                    f"put {self.url(key)} if absent: this file system cannot hard-link ({e.strerror}); "
                    "conditional writes need link(2)"
                ) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._write_meta(key, metadata)
        return True

    def put_file(self, key: str, path: str, metadata: dict[str, str] | None = None) -> None:
        self._write_meta(key, metadata)

        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        self._atomic_write(self._path(key), copy)

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"get {self.url(key)}: no such object") from None

    def get_file(self, key: str, path: str) -> None:
        with self.open_read(key) as src:
            self._atomic_write(Path(path), lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def stat(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        meta = None
        mp = self._meta_path(key)
        if mp.exists():
            meta = json.loads(mp.read_text())
        return ObjectInfo(key.strip("/"), st.st_size, meta, f"{st.st_mtime_ns}-{st.st_size}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.exists():
            return
        out = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):  # temp files and metadata side files
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out.append(rel)
        for rel in sorted(out):
            info = self.stat(rel)
            if info is not None:
                yield info

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta_path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return str(self._path(key)) if key.strip("/") else self.uri

    def sub(self, prefix: str) -> "LocalStore":
        return LocalStore(self.url(prefix.strip("/")))
