"""Config section ``promote``: the gate a new model version must pass to become its model's champion.

    promote:
      primary: probe.top1          # must beat the champion's by more than min_delta
      min_delta: 0.0
      guards: [knn.top1]           # may drop at most max_drop
      max_drop: 0.02
      random_init_margin: 0.0      # the primary must beat the architecture at random init by more
      floors: ["probe.top1>=0.3"]  # absolute minimums, with or without a champion

Scores are named ``<method>.<metric>`` after ``metrics.json`` of ``m3i evaluate``
(:data:`SCORES`); every one of them is higher-is-better.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from m3i.config.core import check_range

__all__ = ["PromoteConfig", "RegistryConfig", "SCORES", "BASELINE_SCORES", "parse_floor"]

SCORES = (
    *(f"{method}.{metric}" for method in ("knn", "probe", "finetune") for metric in ("top1", "top5", "mean_class_top1")),
    "feature_std.eval",
)
"""Every score a policy may name: kNN, linear probe and fine-tune accuracies (fractions in [0, 1]) and the
spread of the eval features (the collapse monitor)."""

BASELINE_SCORES = tuple(s for s in SCORES if s.split(".")[0] in ("knn", "probe"))
"""The scores ``m3i evaluate`` also measures at random init (``metrics.json``'s ``random_init``)."""

_FLOOR = re.compile(r"^\s*([a-z_0-9.]+)\s*>=\s*([-+0-9.eE]+)\s*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _check_score(key: str, name: str, allowed: tuple[str, ...] = SCORES) -> None:
    if name not in allowed:
        raise ValueError(f"{key}={name!r} is not a known score; choose one of {list(allowed)}")


def parse_floor(text: str) -> tuple[str, float]:
    """``"probe.top1>=0.3"`` -> ``("probe.top1", 0.3)``.

    Raises:
        ValueError: Naming the entry, when it is not ``<score> >= <number>`` or names an unknown score.
    """
    m = _FLOOR.match(text)
    if not m:
        raise ValueError(f"promote.floors entry {text!r} is not allowed; write <score>>=<number>, e.g. 'probe.top1>=0.3'")
    try:
        value = float(m.group(2))
    except ValueError:
        raise ValueError(f"promote.floors entry {text!r}: {m.group(2)!r} is not a number") from None
    _check_score(f"promote.floors entry {text!r}: score", m.group(1))
    check_range("promote", f"floors[{m.group(1)}]", value)
    return m.group(1), value


@dataclass(frozen=True)
class RegistryConfig:
    """The optional mirror of every gated candidate in a Kubeflow Model Registry (off by default)."""

    url: str = ""
    """Address of the Model Registry REST API, ``http(s)://host[:port]`` (e.g.
    ``http://model-registry-service.kubeflow:8080``); empty is off. The port defaults to 8080 for
    http and 443 for https."""

    author: str = "m3i"
    """Author recorded on the registered models and versions."""

    token_env: str = "M3I_MODEL_REGISTRY_TOKEN"
    """Name of the environment variable that holds the bearer token (fill it from a Secret; a token is
    never part of a config). When it is unset the client's own default applies: the file named by
    ``KF_PIPELINES_SA_TOKEN_PATH``, else the pod's service-account token."""

    def __post_init__(self) -> None:
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or any(c.isspace() for c in self.url):
                raise ValueError(
                    f"promote.registry.url={self.url!r} is not allowed; use '' (off) or http(s)://host[:port] without a path"
                )
            try:
                parts.port
            except ValueError:
                raise ValueError(f"promote.registry.url={self.url!r} has a port that is not a number in [0, 65535]") from None
        if not self.author:
            raise ValueError("promote.registry.author='' is not allowed; give a name (default m3i)")
        if not _ENV_NAME.match(self.token_env):
            # A value that is not a variable name is most likely a pasted token: refuse it without echoing it.
            raise ValueError(
                "promote.registry.token_env is not an environment variable name; allowed: letters, digits and '_' "
                "(not starting with a digit, at most 128): the NAME of the variable holding the token, never the token"
            )


@dataclass(frozen=True)
class PromoteConfig:
    """When a new model version replaces its model's champion (``m3i promote``)."""

    primary: str = "probe.top1"
    """The score the candidate must improve: it must exceed the champion's, on the same eval data set,
    by more than ``min_delta``. One of :data:`SCORES`."""

    min_delta: float = 0.0
    """How much the primary score must improve on the champion's (a fraction: 0.01 is one point); the
    candidate needs strictly more than this, so 0 asks for any improvement."""

    guards: tuple[str, ...] = ("knn.top1",)
    """Scores that must not fall far: each may be at most ``max_drop`` below the champion's."""

    max_drop: float = 0.02
    """How far each guard score may fall below the champion's (a fraction: 0.02 is two points)."""

    random_init_floor: bool = True
    """Also require the primary score to beat the same architecture at random init (``metrics.json``'s
    ``random_init``, measured by ``m3i evaluate`` with ``evaluate.random_init=true``) by more than
    ``random_init_margin``. Applies with or without a champion. Needs a primary that is scored at random
    init (kNN or probe)."""

    random_init_margin: float = 0.0
    """How much the primary score must beat its random-init baseline by (a fraction)."""

    floors: tuple[str, ...] = ()
    """Absolute minimums, ``<score>>=<number>`` each (``probe.top1>=0.3``), checked with or without a champion."""

    pushgateway: str = ""
    """URL of a Prometheus Pushgateway (``http://host:9091``) that receives the model's promotion metrics
    (decisions counted, the champion's version and promotion time); empty is off. A failed push is a
    warning, never an error."""

    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The optional Kubeflow Model Registry mirror."""

    fail_on_reject: bool = False
    """Whether ``m3i promote`` exits 1 when the gate rejects the candidate (the rejection is recorded
    either way). Off: a rejection is a normal outcome, exit 0. The pipeline's ``fail_on_reject``
    parameter does the same for a run."""

    def __post_init__(self) -> None:
        s = "promote"
        _check_score(f"{s}.primary", self.primary)
        for g in self.guards:
            _check_score(f"{s}.guards", g)
        if self.primary in self.guards:
            raise ValueError(f"promote.guards={list(self.guards)!r} holds the primary score {self.primary!r}; allowed: other scores")
        check_range(s, "min_delta", self.min_delta, 0.0, 1.0)
        check_range(s, "max_drop", self.max_drop, 0.0, 1.0)
        check_range(s, "random_init_margin", self.random_init_margin, 0.0, 1.0)
        if self.random_init_floor and self.primary not in BASELINE_SCORES:
            raise ValueError(
                f"promote.primary={self.primary!r} is not scored at random init, so promote.random_init_floor=true cannot "
                f"apply; choose a primary among {list(BASELINE_SCORES)} or set promote.random_init_floor=false"
            )
        names = [parse_floor(f)[0] for f in self.floors]
        if len(set(names)) != len(names):
            raise ValueError(f"promote.floors={list(self.floors)!r} names a score twice; allowed: one floor per score")
        if self.pushgateway:
            url = self.pushgateway if "://" in self.pushgateway else f"http://{self.pushgateway}"
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
                raise ValueError(
                    f"promote.pushgateway={self.pushgateway!r} is not a URL; allowed: '' (off) or http(s)://host[:port]"
                )

    def floor_values(self) -> dict[str, float]:
        """The ``floors`` as ``{score: minimum}``."""
        return dict(parse_floor(f) for f in self.floors)
