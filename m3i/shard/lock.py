"""One writer per data set: a lock object in the output that names its owner and is kept fresh.

Object stores have no portable create-if-absent, so taking the lock is write, wait, read back:
of two runs that start together, the one whose write landed last keeps the lock and the other
sees a foreign token and stops before it writes anything. Should both pass (a racer slower than
the wait between its check and its write), each checks the lock again right before it publishes,
and only the holder publishes; shard names carry checksums, so their shards never collide. A run refreshes the lock from a
background thread; a lock whose refresh is older than ``stale_seconds`` belongs to a dead run
and is taken over (with a warning naming the old owner). A lock written on this machine (same
host name, boot and pid namespace) by a process that no longer exists is taken over at once,
with a warning: a run killed with ``kill -9`` does not block the next one for ``stale_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from m3i.shard.files import naming
from m3i.storage import Store, StorageError

__all__ = ["LOCK_KEY", "OutputLock", "OutputLocked"]

log = logging.getLogger(__name__)
LOCK_KEY = "_lock.json"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _machine() -> dict[str, str | None]:
    """What tells this machine and pid namespace from another with the same host name (containers, a reboot)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _age(lock: dict[str, Any]) -> float:
    """Seconds since the lock's last refresh (infinite when it holds no readable time: it cannot be fresh)."""
    try:
        return time.time() - float(lock.get("refreshed_unix", 0))
    except (TypeError, ValueError):
        return float("inf")


def _pid_gone(pid: object) -> bool:
    """Whether no process ``pid`` exists here (a pid we may not signal exists; anything odd is not 'gone')."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # os.kill(0 or -n) would signal process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


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
        self.owner = {
            "host": socket.gethostname(), "pid": os.getpid(), **_machine(), "token": self.token, "started_unix": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.store.read_json(LOCK_KEY) if self.store.exists(LOCK_KEY) else None
        except StorageError:
            return None  # unreadable: treat as no lock; the read-back below still settles races

    def _write(self) -> None:
        with naming(self.store.url(LOCK_KEY)):
            self.store.write_json(LOCK_KEY, {**self.owner, "refreshed_unix": time.time()})

    def _refuse(self, other: dict[str, Any]) -> OutputLocked:
        age = _age(other)
        return OutputLocked(
            f"shard: {self.store.url('')} is being written by another run (host {other.get('host')!r}, pid "
            f"{other.get('pid')}, lock refreshed {age:.0f}s ago); wait for it to finish. If that run is dead, its lock "
            f"is taken over once older than shard.lock_stale_seconds={self.stale:g}, or delete {self.store.url(LOCK_KEY)}"
        )

    def _holder_dead_here(self, other: dict[str, Any]) -> bool:
        """Whether ``other`` was written on this machine, in this pid namespace, by a process that is gone."""
        here = self.owner
        same_machine = other.get("host") == here["host"] and all(
            here[k] is not None and other.get(k) == here[k] for k in ("boot_id", "pid_ns")
        )
        return same_machine and _pid_gone(other.get("pid"))

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLocked` naming its holder."""
        other = self._read()
        if other is not None and other.get("token") != self.token:
            age = _age(other)
            if self._holder_dead_here(other):
                log.warning(
                    "shard: taking over the lock of pid %s on this host, which no longer runs (%.0fs since its refresh)",
                    other.get("pid"), age,
                )
            elif age < self.stale:
                raise self._refuse(other)
            else:
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
