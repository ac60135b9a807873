"""SIGTERM as a flag between steps, and the grace period Kubernetes gives the save it triggers.

Kubernetes sends SIGTERM, waits the pod's ``terminationGracePeriodSeconds`` and then sends
SIGKILL. ``m3i launch`` puts the same number in the rank's environment as
:data:`GRACE_ENV`, so the loop knows when the kill comes: it logs that deadline, saves at the
next step boundary, warns before a save that the last one took longer than the time left, and
says afterwards how much of the grace period the save used. A save killed midway is never
mistaken for a complete one (the marker is written last); the previous checkpoint stays the
latest, and only the steps since it are lost.

    sigterm = SigTerm()                      # installs the handler
    ...
    if sigterm.received:
        sigterm.before_save(step, last_save_seconds)
        ...save...
        sigterm.after_save(step, seconds)
    sigterm.restore()
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time

__all__ = ["GRACE_ENV", "SigTerm", "grace_seconds"]

log = logging.getLogger(__name__)

GRACE_ENV = "M3I_TERMINATION_GRACE_SECONDS"
"""Seconds between SIGTERM and SIGKILL: the pod's ``terminationGracePeriodSeconds``, set by ``m3i launch``."""


def grace_seconds(environ: dict[str, str] | None = None) -> float | None:
    """The grace period from :data:`GRACE_ENV`, or ``None`` when it is unset or not a positive number (logged)."""
    text = (os.environ if environ is None else environ).get(GRACE_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        log.warning("%s=%r is not a positive number of seconds; the SIGTERM save runs without a known deadline", GRACE_ENV, text)
        return None
    return value


class SigTerm:
    """Turns SIGTERM into :attr:`received`, which the loop checks between steps, and keeps its deadline.

    Args:
        grace: Seconds from SIGTERM to SIGKILL; ``None`` reads :data:`GRACE_ENV`.
    """

    def __init__(self, grace: float | None = None) -> None:
        self.grace = grace if grace is not None else grace_seconds()
        self.received = False
        self.at: float | None = None
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        self.at = time.monotonic()
        if self.grace is None:
            log.warning("SIGTERM: saving a checkpoint at the next step boundary (no %s: the deadline is unknown)", GRACE_ENV)
        else:
            kill = time.strftime("%H:%M:%S", time.localtime(time.time() + self.grace))
            log.warning("SIGTERM: saving a checkpoint at the next step boundary; SIGKILL expected at about %s (%s=%g)", kill, GRACE_ENV, self.grace)

    def seconds_left(self) -> float | None:
        """Seconds until the expected SIGKILL; ``None`` before SIGTERM or without a known grace period."""
        if self.at is None or self.grace is None:
            return None
        return self.grace - (time.monotonic() - self.at)

    def before_save(self, step: int, last_save_seconds: float | None) -> None:
        """Log the time left for the SIGTERM save of ``step``; warn when the last save took longer than that."""
        left = self.seconds_left()
        if left is None:
            return
        if last_save_seconds is not None and last_save_seconds > left:
            log.warning(
                "SIGTERM save of step %d: the last save took %.1f s but %.1f s of the %g s grace period are left; "
                "it may be killed midway, leaving the previous checkpoint the latest (raise terminationGracePeriodSeconds)",
                step, last_save_seconds, max(left, 0.0), self.grace,
            )
        else:
            log.info("SIGTERM save of step %d: %.1f s of the %g s grace period left", step, max(left, 0.0), self.grace)

    def after_save(self, step: int, seconds: float) -> None:
        """Log how much of the grace period the SIGTERM save of ``step`` used; warn when it ran past it."""
        left = self.seconds_left()
        if left is None:
            return
        if left < 0:
            log.warning(
                "SIGTERM save of step %d took %.1f s and ended %.1f s after the %g s grace period: on Kubernetes it "
                "would have been killed; raise terminationGracePeriodSeconds", step, seconds, -left, self.grace,
            )
        else:
            log.info("SIGTERM save of step %d took %.1f s; %.1f s of the grace period to spare", step, seconds, left)

    def restore(self) -> None:
        """Put the previous SIGTERM handler back."""
        signal.signal(signal.SIGTERM, self._old)
