"""A rank's ``/metrics`` endpoint: serves a registry over HTTP from a daemon thread, and only from this process.

Each rank serves on ``metrics.port + local_rank``, so the ranks on one node do not clash. Build
the endpoint in the rank's main process before the DataLoader forks its workers: a forked child
inherits neither the serving thread (``fork`` copies only the calling thread) nor, thanks to an
at-fork hook, the listening socket, so workers serve nothing and never keep the port bound after
:meth:`MetricsEndpoint.close`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from m3i.config.metrics import MetricsConfig

__all__ = ["MetricsEndpoint"]

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves ``registry`` on ``http://<metrics.host>:<metrics.port + local_rank>/metrics``.

    Args:
        registry: What to serve.
        cfg: The ``metrics`` section (``host``, ``port``; ``port`` must not be 0).
        rank: Global rank, for messages.
        local_rank: Rank on this node: the port offset.

    Raises:
        ValueError: When ``port + local_rank`` is above 65535.
        OSError: When the port cannot be bound (the message names it and the keys that chose it).
    """

    def __init__(self, registry: CollectorRegistry, cfg: MetricsConfig, *, rank: int, local_rank: int) -> None:
        check_port(cfg, local_rank)
        self.cfg, self.rank, self.local_rank = cfg, rank, local_rank
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self._serve(registry, cfg.host, cfg.port + local_rank)

    def _serve(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise OSError(
                e.errno,
                f"metrics endpoint of rank {self.rank}: cannot bind {host}:{port} "
                f"(metrics.port={self.cfg.port} + local_rank={self.local_rank}): {e.strerror}; "
                "choose another metrics.port, or 0 to disable the endpoint",
            ) from e
        self.port = self._server.server_port
        # A forked child (a DataLoader worker) inherits the listening socket but not the thread
        # that serves it: close its copy so only this process holds the port.
        ref = weakref.ref(self)

        def forget_in_child() -> None:
            endpoint = ref()
            if endpoint is not None:
                endpoint._drop_in_child()

        os.register_at_fork(after_in_child=forget_in_child)
        log.info("rank %d serves metrics on http://%s:%d/metrics", self.rank, host, self.port)

    def _drop_in_child(self) -> None:
        if self._server is not None:
            try:
                self._server.socket.close()
            except OSError:
                pass
        # Never shutdown() here: no thread serves in the child, it would wait forever.
        self._server = self._thread = None
        self.port = None

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics``, or ``None`` once closed."""
        if self.port is None:
            return None
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "") else self.cfg.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self.port = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def check_port(cfg: MetricsConfig, local_rank: int) -> None:
    """Refuse a ``metrics.port + local_rank`` that is not a port (a ``ValueError`` naming both)."""
    if cfg.port and cfg.port + local_rank > 65535:
        raise ValueError(
            f"metrics.port={cfg.port} + local_rank={local_rank} = {cfg.port + local_rank} is not a port; "
            "allowed metrics.port + local_rank <= 65535"
        )
