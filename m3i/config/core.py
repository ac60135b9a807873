"""Config machinery: frozen dataclasses, YAML presets, ``--set`` overrides, validation.

Every config section is a frozen dataclass whose fields carry a docstring right under
them. A section validates itself in ``__post_init__`` with the ``check_*`` helpers
below, which raise ``ValueError`` naming the field, the bad value and what is allowed.

Two checks need no line in any section: they follow the field's type whenever a mapping
becomes a section (:func:`from_dict`: YAML files, presets, ``--set``, a run's saved config).
A ``float`` field takes only finite numbers (``.inf`` and ``.nan`` are refused); an ``int``
field only whole numbers written as integers (``1e30`` and ``10.0`` are refused) that fit
in 64 bits. Counts, sizes and rates get their upper bounds in their own :func:`check_range`
call, from the ``MAX_*`` table below; :func:`check_range` refuses infinity and NaN too.

Every message is one line of bounded length, whatever the input (:mod:`m3i.config.messages`).
Reading config text (YAML files, presets, ``--set``) lives in :mod:`m3i.config.yaml_text`, whose
functions this module re-exports.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Iterable, Mapping, Sequence

from m3i.config.messages import cap_message, listed, shown
from m3i.config.yaml_text import apply_overrides, parse_override, read_yaml_sections

__all__ = [
    "MAX_BATCH",
    "MAX_COUNT",
    "MAX_LR",
    "MAX_WIDTH",
    "check_choice",
    "check_range",
    "check_positive",
    "cap_message",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override",
    "read_yaml_sections",
    "shown",
]

# Upper bounds of the fields that are counts, sizes or rates: far above any real run, low
# enough that a typo (an extra zero run, 1e30) is refused before it allocates or schedules.
MAX_COUNT = 2**31 - 1
"""Steps, intervals, epochs, samples, classes, retries: what fits a signed 32-bit int."""

MAX_BATCH = 2**20
"""Samples in one batch on one rank."""

MAX_WIDTH = 2**16
"""Widths and dimensions of a network (embedding, projector, text tower); heads likewise."""

MAX_LR = 10.0
"""Learning rates and weight decays (AdamW); real ones are below 1."""

_INT64 = 2**63
_INT_TEXT = re.compile(r"^[-+]?[0-9][0-9_]*$")


def check_choice(section: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{section}.{name}={shown(value)} is not allowed; choose one of {allowed}")


def check_range(
    section: str,
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``lo <= value <= hi`` (bounds optional, open if asked).

    Infinity and NaN are refused whatever the bounds.
    """
    finite = not (isinstance(value, float) and not math.isfinite(value))
    bad = (
        not finite
        or (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        what = "is out of range" if finite else "is not a finite number"
        raise ValueError(f"{section}.{name}={shown(value)} {what}; allowed {left}{lo_s}, {hi_s}{right}")


def check_positive(section: str, name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value > 0``."""
    check_range(section, name, value, 0, None, lo_open=True)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ``ValueError``."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{section}.{name}=None is not allowed; expected {getattr(tp, '__name__', tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{section}.{name}={shown(value)} must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, section=f"{section}.{name}")
    origin = typing.get_origin(tp)
    if origin in (tuple, list, Sequence):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{section}.{name}={shown(value)} must be a list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(section, name, item_tp, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{section}.{name}={shown(value)} is not a boolean; use true or false")
    if tp is int:
        return _coerce_int(section, name, value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{section}.{name}={shown(value)} is not a number")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{section}.{name}={shown(value)} is not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{section}.{name}={shown(value)} is not a finite number; infinity and NaN are not allowed")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{section}.{name}={shown(value)} is not a string")
        return str(value)
    return value


def _coerce_int(section: str, name: str, value: Any) -> int:
    """An int field takes an int, or text of digits; never a float, even a whole one (``1e30``, ``10.0``)."""
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        value = int(value.strip().replace("_", ""))
    if isinstance(value, bool) or not isinstance(value, int):
        hint = "; write a whole number without a decimal point or exponent" if _looks_numeric(value) else ""
        raise ValueError(f"{section}.{name}={shown(value)} is not an integer{hint}")
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"{section}.{name}={shown(value)} is out of range; allowed [-2**63, 2**63)")
    return value


def _looks_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def from_dict(cls: type, data: Mapping[str, Any], *, section: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, coercing types; unknown keys raise ``ValueError``."""
    section = section or cls.__name__
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ValueError(f"{section}: key {shown(key)} is not a string; allowed keys are {sorted(names)}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {listed(unknown)}; allowed keys are {sorted(names)}")
    kwargs = {k: _coerce(section, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a (nested) config dataclass."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(obj)
