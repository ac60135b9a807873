"""Config machinery: frozen dataclasses, YAML presets, ``--set`` overrides, validation.

Every config section is a frozen dataclass whose fields carry a docstring right under
them. A section validates itself in ``__post_init__`` with the ``check_*`` helpers
below, which raise ``ValueError`` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping, Sequence

import yaml

__all__ = [
    "check_choice",
    "check_range",
    "check_positive",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override",
]


def check_choice(section: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r} is not allowed; choose one of {allowed}")


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
    """Raise ``ValueError`` unless ``lo <= value <= hi`` (bounds optional, open if asked)."""
    bad = (
        (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
        or value != value  # NaN
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{section}.{name}={value!r} is out of range; allowed {left}{lo_s}, {hi_s}{right}")


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
            raise ValueError(f"{section}.{name}={value!r} must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, section=f"{section}.{name}")
    origin = typing.get_origin(tp)
    if origin in (tuple, list, Sequence):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{section}.{name}={value!r} must be a list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(section, name, item_tp, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{section}.{name}={value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{section}.{name}={value!r} is not an integer")
        try:
            if isinstance(value, str):
                value = value.replace("_", "")
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise ValueError(f"{section}.{name}={value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{section}.{name}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{section}.{name}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{section}.{name}={value!r} is not a string")
        return str(value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], *, section: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, coercing types; unknown keys raise ``ValueError``."""
    section = section or cls.__name__
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` into (path, YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ValueError(f"--set {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of a nested dict with each ``a.b.c=value`` override set."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {text!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out
