"""Config section ``metrics``: the Prometheus endpoint each training rank serves, and TrainJob progress."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from m3i.config.core import MAX_COUNT, check_range

__all__ = ["MetricsConfig"]

_JOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:")


@dataclass(frozen=True)
class MetricsConfig:
    """How training exports metrics: a scrape endpoint per rank and an optional final push."""

    port: int = 9400
    """Base port of the ``/metrics`` endpoint; each rank serves on ``port + local_rank`` so the
    ranks on one node do not clash. 0 disables the endpoint (metrics are still recorded)."""

    host: str = "0.0.0.0"
    """Address the endpoint binds to (``127.0.0.1`` keeps it node-local)."""

    pushgateway: str = ""
    """URL of a Prometheus Pushgateway (``http://host:9091``) that receives the final run summary;
    empty turns the push off."""

    job: str = "m3i-train"
    """The ``job`` label of the pushed summary (the Pushgateway's grouping key starts with it)."""

    interval_steps: int = 1
    """Record step metrics every this many steps (counters still count every step); also the
    cadence of TrainJob progress updates (``trainer_status``)."""

    trainer_status: bool = True
    """Under Kubeflow Trainer v2 with its ``TrainJobStatus`` feature gate (the pod has
    ``KUBEFLOW_TRAINER_SERVER_URL``), rank 0 posts progress, remaining time and loss parts to
    ``TrainJob.status.trainerStatus`` every ``interval_steps`` steps, at most every 5 s, and on the
    last step (:mod:`m3i.train.progress`). Elsewhere it does nothing; false never posts."""

    def __post_init__(self) -> None:
        s = "metrics"
        check_range(s, "port", self.port, 0, 65535)
        if not self.host:
            raise ValueError("metrics.host='' is not allowed; give an address such as 0.0.0.0 or 127.0.0.1")
        if self.pushgateway:
            url = self.pushgateway if "://" in self.pushgateway else f"http://{self.pushgateway}"
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
                raise ValueError(
                    f"metrics.pushgateway={self.pushgateway!r} is not a URL; "
                    "allowed: '' (off) or http(s)://host[:port]"
                )
        if not self.job or not set(self.job) <= _JOB_CHARS:
            raise ValueError(
                f"metrics.job={self.job!r} is not allowed; use a non-empty name of letters, digits and _-.:"
            )
        check_range(s, "interval_steps", self.interval_steps, 1, MAX_COUNT)
