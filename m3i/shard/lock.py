"""One writer per data set: a lock object in the output that names its owner and is kept fresh.

Object stores have no portable create-if-absent, so taking the lock is write, wait, read back:
of two runs that start together, the one whose write landed last keeps the lock and the other
sees a foreign token and stops before it writes anything. Should both pass (a racer slower than
the wait between its check and its write), each checks the lock again right before it publishes,
and only the holder publishes; shard names carry checksums, so their shards never collide. A run refreshes the lock from a
background thread; a lock whose refresh is older than ``stale_seconds`` belongs to a dead run
and is taken over (with a warning naming the old owner).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from m3i.storage import Store, StorageError

__all__ = ["LOCK_KEY", "OutputLock", "OutputLocked"]

log = logging.getLogger(__name__)
LOCK_KEY = "_lock.json"


class OutputLocked(RuntimeError):
    """Another live run is writing the same output."""


class OutputLock:
    """Hold ``_lock.json`` in ``store`` for the life of a ``with`` block.

    Args:
        store: The output store.
        stale_seconds: Age of the last refresh after which a lock is taken over.
        settle_seconds: Wait between writing the lock and reading it back.
    """

    def __init__(self, store: Store, stale_seconds: float, settle_seconds: float = 0.5) -> None:
        self.store, self.stale, self.settle = store, stale_seconds, settle_seconds
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "started_unix": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.store.read_json(LOCK_KEY) if self.store.exists(LOCK_KEY) else None
        except StorageError:
            return None  # unreadable: treat as no lock; the read-back below still settles races

    def _write(self) -> None:
        self.store.write_json(LOCK_KEY, {**self.owner, "refreshed_unix": time.time()})

    def _refuse(self, other: dict[str, Any]) -> OutputLocked:
        age = time.time() - float(other.get("refreshed_unix", 0))
        return OutputLocked(
            f"shard: {self.store.url('')} is being written by another run (host {other.get('host')!r}, pid "
            f"{other.get('pid')}, lock refreshed {age:.0f}s ago); wait for it to finish. If that run is dead, its lock "
            f"is taken over once older than shard.lock_stale_seconds={self.stale:g}, or delete {self.store.url(LOCK_KEY)}"
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLocked` naming its holder."""
        other = self._read()
        if other is not None and other.get("token") != self.token:
            age = time.time() - float(other.get("refreshed_unix", 0))
            if age < self.stale:
                raise self._refuse(other)
            log.warning("shard: taking over a stale lock of host %r pid %s (%.0fs without a refresh)", other.get("host"), other.get("pid"), age)
        self._write()
        time.sleep(self.settle)
        now = self._read()
        if now is None or now.get("token") != self.token:
            raise self._refuse(now or {})
        self._thread = threading.Thread(target=self._refresh, name="m3i-shard-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        every = max(1.0, self.stale / 4)
        while not self._stop.wait(every):
            try:
                now = self._read()
                if now is not None and now.get("token") != self.token:
                    log.error("shard: another run took over %s; this run will not publish", LOCK_KEY)
                    return
                self._write()
            except StorageError as e:  # the next refresh may succeed; the lock goes stale only after `stale`
                log.warning("shard: could not refresh %s: %s", LOCK_KEY, e)

    def check(self) -> None:
        """Raise :class:`OutputLocked` unless the lock is still this run's (call right before publishing)."""
        now = self._read()
        if now is None or now.get("token") != self.token:
            raise self._refuse(now or {})

    def release(self) -> None:
        """Stop refreshing and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = self._read()
        if now is not None and now.get("token") == self.token:
            self.store.delete(LOCK_KEY)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
