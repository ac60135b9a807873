"""Progress on the Kubeflow Trainer v2 TrainJob: rank 0 posts ``status.trainerStatus``.

    status = build_trainer_status(cfg.metrics, is_main=info.is_main)  # None outside a TrainJob
    for step in ...:
        if status is not None:
            status.on_step(step, cfg.train.steps, parts)
    status.close()

With its ``TrainJobStatus`` feature gate on, Kubeflow Trainer (v2.2+, KEP-2779) injects into
every trainer container:

* ``KUBEFLOW_TRAINER_SERVER_URL``: ``https://<controller>:<port>/apis/trainer.kubeflow.org/v1alpha1/
  namespaces/<ns>/trainjobs/<name>/status``, which takes ``POST`` with a JSON body;
* ``KUBEFLOW_TRAINER_SERVER_CA_CERT``: the CA file that signs the endpoint's certificate;
* ``KUBEFLOW_TRAINER_SERVER_TOKEN``: a projected service-account token (a JWT that rotates),
  sent as ``Authorization: Bearer <token>``.

The body is ``{"trainerStatus": {"progressPercentage": int 0..100, "estimatedRemainingSeconds":
int >= 0, "metrics": [{"name": str, "value": str}, ...], "lastUpdatedTime": RFC 3339}}``; the
controller applies it to ``TrainJob.status.trainerStatus`` (``kubectl get trainjob NAME -o
jsonpath='{.status.trainerStatus}'``).

Reporting must never slow or stop training: :meth:`TrainerStatusReporter.update` only puts the
body in a one-slot queue (the newest update replaces one not yet sent) and a daemon thread
posts it, at most every :data:`MIN_INTERVAL_SECONDS` (Kubeflow asks clients to throttle), with
:data:`REQUEST_TIMEOUT_SECONDS` per socket operation. Failures are counted, and logged once
per outage. TLS is always verified against the injected CA; the CA and the token are read
again for every post, as both rotate.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Callable, Mapping
from urllib.parse import urlsplit

from m3i.config.metrics import MetricsConfig

__all__ = [
    "CLOSE_TIMEOUT_SECONDS",
    "ENV_CA_CERT",
    "ENV_TOKEN",
    "ENV_URL",
    "ETA_WINDOW_STEPS",
    "MIN_INTERVAL_SECONDS",
    "REQUEST_TIMEOUT_SECONDS",
    "TrainerStatusReporter",
    "build_trainer_status",
]

log = logging.getLogger(__name__)

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"

MIN_INTERVAL_SECONDS = 5.0
"""Least time between two posts (Kubeflow's guidance for clients); :meth:`close` does not wait it."""

REQUEST_TIMEOUT_SECONDS = 3.0
"""Timeout of each socket operation of a post (connect, TLS handshake, response)."""

CLOSE_TIMEOUT_SECONDS = 5.0
"""How long :meth:`TrainerStatusReporter.close` waits for the final update by default."""

ETA_WINDOW_STEPS = 20
"""The remaining time is estimated from the wall time of this many recent steps."""

# Limits of the TrainJob CRD (trainer.kubeflow.org/v1alpha1 Metric, TrainerStatus).
_MAX_METRICS = 256
_MAX_METRIC_CHARS = 64
_INT32_MAX = 2**31 - 1


def _metric_value(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)[:_MAX_METRIC_CHARS]
    return str(value) if isinstance(value, int) else format(value, ".6g")


class TrainerStatusReporter:
    """Posts TrainJob progress to Kubeflow Trainer's status endpoint from a daemon thread.

    Only rank 0 should build one (every rank's container gets the variables). Methods called by
    training (:meth:`on_step`, :meth:`update`, :meth:`close`) never raise for an unreachable,
    slow or refusing endpoint, and :meth:`update` never waits for the network.

    Attributes:
        url: The endpoint (no secret in it).
        sent: Posts the endpoint accepted (HTTP 2xx).
        failures: Posts that failed (connection, TLS, timeout, HTTP error, unreadable token).
    """

    def __init__(
        self,
        url: str,
        ca_file: str,
        token_file: str,
        *,
        interval_steps: int = 1,
        min_interval_seconds: float = MIN_INTERVAL_SECONDS,
        timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start the sender thread.

        Args:
            url: The ``https://`` status URL (``KUBEFLOW_TRAINER_SERVER_URL``).
            ca_file: Path of the CA certificate that verifies the endpoint.
            token_file: Path of the bearer token, read again for every post.
            interval_steps: :meth:`on_step` queues an update every this many steps (and on the last).
            min_interval_seconds: Least time between two posts; updates in between replace each other.
            timeout_seconds: Timeout of each socket operation of a post.
            clock: Monotonic clock of the step times behind the remaining-time estimate.

        Raises:
            ValueError: When ``url`` is not ``https://host...``, ``ca_file`` or ``token_file`` is
                empty, or a number is out of range.
        """
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or any(c.isspace() for c in url):
            raise ValueError(f"{ENV_URL}={url!r} is not an https:// URL; the bearer token is only sent over verified TLS")
        if not ca_file:
            raise ValueError(f"{ENV_CA_CERT}={ca_file!r}: a CA certificate file is required to verify {url}")
        if not token_file:
            raise ValueError(f"{ENV_TOKEN}={token_file!r}: a token file is required to authenticate to {url}")
        if interval_steps < 1:
            raise ValueError(f"interval_steps={interval_steps} is not allowed; use 1 or more")
        if min_interval_seconds < 0 or timeout_seconds <= 0:
            raise ValueError(
                f"min_interval_seconds={min_interval_seconds}, timeout_seconds={timeout_seconds}: "
                "the first must be >= 0 and the second > 0"
            )
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.interval_steps = interval_steps
        self.min_interval_seconds = min_interval_seconds
        self.timeout_seconds = timeout_seconds
        self.sent = self.failures = 0
        self._clock = clock
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=ETA_WINDOW_STEPS + 1)
        self._cond = threading.Condition()
        self._slot: bytes | None = None  # the one-slot queue: the newest update not yet sent
        self._busy = False  # a post is in flight
        self._closing = False
        self._down = False  # inside an outage: its warning was logged
        self._warned_names = False
        self._thread = threading.Thread(target=self._run, name="m3i-trainer-status", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kw) -> TrainerStatusReporter | None:
        """A reporter for the endpoint Kubeflow Trainer injected, or None outside such a pod.

        Args:
            environ: The environment (``os.environ`` when None).
            **kw: Passed on to the constructor (``interval_steps`` and the like).

        Returns:
            None when ``KUBEFLOW_TRAINER_SERVER_URL`` is unset or empty, else a started reporter.

        Raises:
            ValueError: When the URL is set but it or its companion variables are unusable.
        """
        env = os.environ if environ is None else environ
        url = env.get(ENV_URL, "").strip()
        if not url:
            return None
        return cls(url, env.get(ENV_CA_CERT, "").strip(), env.get(ENV_TOKEN, "").strip(), **kw)

    # ------------------------------------------------------------------------- training side

    def on_step(self, step: int, steps: int, parts: Mapping[str, float]) -> None:
        """Note a finished step; every ``interval_steps`` steps and on the last, queue an update.

        The update holds the progress ``step / steps`` in percent (rounded down, so 100 only at
        the end), the remaining time from the mean wall time of the last
        :data:`ETA_WINDOW_STEPS` steps (absent until two steps were seen), the loss parts of
        ``parts`` (keys starting with ``loss``) and ``step`` / ``steps``.

        Args:
            step: The optimizer step that finished.
            steps: The run's total steps (``train.steps``).
            parts: The step's loss dict, as floats.
        """
        now = self._clock()
        self._recent.append((step, now))
        last = step >= steps
        if step % self.interval_steps and not last:
            return
        eta = None
        if last:
            eta = 0.0
        elif len(self._recent) > 1:
            (s0, t0), (s1, t1) = self._recent[0], self._recent[-1]
            if s1 > s0:
                eta = (t1 - t0) / (s1 - s0) * (steps - step)
        percent = 100 if last else int(100 * step // max(steps, 1))
        metrics = {k: v for k, v in parts.items() if k.startswith("loss")}
        metrics.update(step=step, steps=steps)
        self.update(percent, eta, metrics)

    def update(
        self,
        progress_percentage: float | None = None,
        estimated_remaining_seconds: float | None = None,
        metrics: Mapping[str, object] | None = None,
    ) -> None:
        """Queue an update for the sender; it replaces one not yet sent. Returns at once.

        Args:
            progress_percentage: Percent done, clamped to 0..100; None (or NaN) leaves it out.
            estimated_remaining_seconds: Seconds left, rounded and clamped to 0..2**31-1; None
                (or NaN) leaves it out.
            metrics: Name -> value; values are sent as strings (floats with 6 significant
                digits). Names must have 1 to 64 characters (others are dropped, with one warning).
        """
        status: dict[str, object] = {}
        if progress_percentage is not None and not math.isnan(progress_percentage):
            status["progressPercentage"] = int(min(100.0, max(0.0, progress_percentage)))
        if estimated_remaining_seconds is not None and not math.isnan(estimated_remaining_seconds):
            status["estimatedRemainingSeconds"] = round(min(float(_INT32_MAX), max(0.0, estimated_remaining_seconds)))
        items = []
        for name, value in (metrics or {}).items():
            if 0 < len(name) <= _MAX_METRIC_CHARS and len(items) < _MAX_METRICS:
                items.append({"name": name, "value": _metric_value(value)})
            elif not self._warned_names:
                self._warned_names = True
                log.warning("trainer status: metric %r dropped (names have 1-%d characters, at most %d metrics)",
                            name, _MAX_METRIC_CHARS, _MAX_METRICS)
        if items:
            status["metrics"] = items
        status["lastUpdatedTime"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps({"trainerStatus": status}).encode()
        with self._cond:
            if self._closing:
                return
            self._slot = body
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until the queued update was posted (or failed), at most ``timeout`` seconds.

        Returns:
            True when nothing is queued or in flight any more.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._slot is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> bool:
        """Send the queued update without waiting out the throttle, then stop the sender.

        Waits at most ``timeout`` seconds (a post in flight to a hung endpoint counts against
        it); the daemon thread is then left behind and never holds the process up. Later
        updates are ignored. Safe to call twice.

        Returns:
            True when the last queued update was posted or failed within ``timeout``.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        if not done:
            log.warning("trainer status: the final update was not sent within %.1fs; %s may be slow or down", timeout, self.url)
        return done

    # ------------------------------------------------------------------------- sender thread

    def _run(self) -> None:
        next_post = 0.0
        while True:
            with self._cond:
                while self._slot is None and not self._closing:
                    self._cond.wait()
                while self._slot is not None and not self._closing and (delay := next_post - time.monotonic()) > 0:
                    self._cond.wait(delay)  # newer updates replace the slot meanwhile; close() cuts it short
                body, self._slot = self._slot, None
                if body is None:  # closing, nothing left
                    self._cond.notify_all()
                    return
                self._busy = True
            try:
                self._post(body)
            finally:
                next_post = time.monotonic() + self.min_interval_seconds
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _post(self, body: bytes) -> None:
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
            # A fresh context per post: the injected CA file is a ConfigMap that follows rotation.
            context = ssl.create_default_context(cafile=self.ca_file)
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=self.timeout_seconds, context=context) as response:
                response.read(1 << 16)
        except urllib.error.HTTPError as e:
            self._failed(f"HTTP {e.code}: {self._reason(e)}")
        except urllib.error.URLError as e:  # refused, unresolvable, TLS verification, ...: name the cause
            cause = e.reason
            self._failed(f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause))
        # Anything else too (TimeoutError, ssl.SSLError, OSError, a bad CA file,
        # http.client.HTTPException, ...): this thread must outlive any failure.
        except Exception as e:  # noqa: BLE001
            self._failed(f"{type(e).__name__}: {e}")
        else:
            self.sent += 1
            if self._down:
                self._down = False
                log.info("trainer status: %s accepts updates again (%d failed posts so far)", self.url, self.failures)

    @staticmethod
    def _reason(e: urllib.error.HTTPError) -> str:
        """The ``message`` of the controller's metav1.Status reply, else the HTTP reason."""
        try:
            return str(json.loads(e.read(4096) or b"{}").get("message") or e.reason)
        except (ValueError, OSError, AttributeError):
            return str(e.reason)

    def _failed(self, why: str) -> None:
        self.failures += 1
        if not self._down:
            self._down = True
            log.warning(
                "trainer status: posting progress to %s failed (%s); training goes on, and further failures "
                "are only counted until a post succeeds", self.url, why,
            )


def build_trainer_status(cfg: MetricsConfig, is_main: bool, environ: Mapping[str, str] | None = None) -> TrainerStatusReporter | None:
    """The rank's TrainJob progress reporter, or None when it has none to run.

    Args:
        cfg: The ``metrics`` section (``trainer_status`` switches it, ``interval_steps`` paces it).
        is_main: Whether this is rank 0, the only rank that reports.
        environ: The environment (``os.environ`` when None).

    Returns:
        None off rank 0, with ``metrics.trainer_status`` false, outside a TrainJob with the
        ``TrainJobStatus`` gate (no ``KUBEFLOW_TRAINER_SERVER_URL``), or when the injected
        variables are unusable (logged as a warning: progress is not worth failing a run for).
    """
    if not (is_main and cfg.trainer_status):
        return None
    try:
        return TrainerStatusReporter.from_env(environ, interval_steps=cfg.interval_steps)
    except ValueError as e:
        log.warning("trainer status: not reporting TrainJob progress: %s", e)
        return None
