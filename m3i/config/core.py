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
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Iterable, Mapping, Sequence

import yaml

__all__ = [
    "MAX_BATCH",
    "MAX_COUNT",
    "MAX_LR",
    "MAX_WIDTH",
    "check_choice",
    "check_range",
    "check_positive",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override",
    "read_yaml_sections",
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
_TAG = "tag:yaml.org,2002:"


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
        raise ValueError(f"{section}.{name}={value!r} {what}; allowed {left}{lo_s}, {hi_s}{right}")


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
        return _coerce_int(section, name, value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{section}.{name}={value!r} is not a number")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{section}.{name}={value!r} is not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{section}.{name}={value!r} is not a finite number; infinity and NaN are not allowed")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{section}.{name}={value!r} is not a string")
        return str(value)
    return value


def _coerce_int(section: str, name: str, value: Any) -> int:
    """An int field takes an int, or text of digits; never a float, even a whole one (``1e30``, ``10.0``)."""
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        value = int(value.strip().replace("_", ""))
    if isinstance(value, bool) or not isinstance(value, int):
        hint = "; write a whole number without a decimal point or exponent" if _looks_numeric(value) else ""
        raise ValueError(f"{section}.{name}={value!r} is not an integer{hint}")
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"{section}.{name}={value!r} is out of range; allowed [-2**63, 2**63)")
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
            raise ValueError(f"{section}: key {key!r} is not a string; allowed keys are {sorted(names)}")
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
    """Parse ``section.key=value`` into (path, YAML-parsed value).

    A value that is not valid YAML is taken as plain text (``--set train.run_id=@nightly``),
    unless it starts as a YAML list, mapping or quoted string (``[``, ``{``, ``"``, ``'``):
    then it was meant as YAML and is refused.

    Raises:
        ValueError: No ``=``, an empty key, or a list, mapping or quoted value that does not parse.
    """
    if "=" not in text:
        raise ValueError(f"--set {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ValueError(f"--set {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as e:
        if raw.strip()[:1] not in ("[", "{", '"', "'"):
            value = raw
        else:
            problem = _yaml_problem(e, column_offset=len(path) + 1)
            raise ValueError(f"--set {text!r}: the value is not valid YAML: {problem}") from None
    return parts, value


def read_yaml_sections(text: str, origin: str) -> dict[str, Any]:
    """Parse a config file: one YAML mapping of section names to mappings of keys.

    Args:
        text: The file's text.
        origin: What to call it in errors (its path, ``preset demo``).

    Returns:
        The sections as plain dicts; an empty file (or ``null``) gives ``{}``.

    Raises:
        ValueError: One line ``<origin>: line L, column C: <what is wrong>; expected ...`` on
            a YAML syntax error (tabs, unclosed brackets, bad indentation, a second document),
            a top level or a section that is not a mapping, a key that is not a string, a key
            given twice in one mapping, or a value YAML cannot construct.
    """
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(f"{origin}: {_yaml_problem(e)}") from None
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _TAG + "null"):
            return {}
        if not isinstance(root, yaml.MappingNode):
            raise ValueError(
                f"{origin}: {_at(root.start_mark)}: the top level is {_node_kind(root)}; "
                "a config file must be a mapping of sections (section:, then indented key: value lines)"
            )
        try:
            _check_keys(root, origin, set())
        except RecursionError:
            raise ValueError(f"{origin}: nested too deeply; expected a config of a few levels") from None
        for key_node, value_node in root.value:
            if key_node.tag != _TAG + "merge" and not isinstance(value_node, yaml.MappingNode):
                raise ValueError(
                    f"{origin}: {_at(value_node.start_mark)}: section {key_node.value!r} is {_node_kind(value_node)}; "
                    "expected a mapping of keys (indented key: value lines under it)"
                )
        try:
            data = loader.construct_document(root)
        except yaml.YAMLError as e:
            raise ValueError(f"{origin}: {_yaml_problem(e)}") from None
    finally:
        loader.dispose()
    return data


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but a value it cannot build (``2024-13-45`` read as a date) says where it is."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as a {node.tag.removeprefix(_TAG)} ({e}); quote it to keep it text",
                node.start_mark,
            ) from None


def _at(mark: Any, column_offset: int = 0) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1 + column_offset}"


def _node_kind(node: Any) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = node.tag.removeprefix(_TAG)
    if kind == "null":
        return "empty (null)"
    return f"the {'string' if kind == 'str' else kind} {node.value!r}"


def _check_keys(node: Any, origin: str, seen: set[int]) -> None:
    """Every key of every mapping under ``node`` is a string, and none is given twice."""
    if id(node) in seen:  # an alias: checked where its anchor is (and no exponential walk)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys(item, origin, seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _TAG + "merge":
            pass
        elif not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "str"):
            shown = repr(key_node.value) if isinstance(key_node, yaml.ScalarNode) else ""
            raise ValueError(
                f"{origin}: {_at(key_node.start_mark)}: key {shown + ' ' if shown else ''}is {_node_kind(key_node)}; "
                "expected a name (quote it if it must look like a number, boolean or null)"
            )
        elif key_node.value in first:
            raise ValueError(
                f"{origin}: {_at(key_node.start_mark)}: key {key_node.value!r} is given twice "
                f"(first at {_at(first[key_node.value])}); expected each key once"
            )
        else:
            first[key_node.value] = key_node.start_mark
        _check_keys(value_node, origin, seen)


def _yaml_problem(e: BaseException, column_offset: int = 0) -> str:
    """One line from a PyYAML error: where, what went wrong, and what the parser was reading."""
    if isinstance(e, RecursionError):
        return "nested too deeply; expected a config of a few levels"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if "'\\t'" in problem or "\t" in problem:
        problem, context = "found a tab character; expected spaces (YAML indents with spaces only)", None
    elif "another document" in problem:
        problem, context = "found a second document (---); expected one mapping of sections", None
    text = " ".join(f"{_at(mark, column_offset) + ': ' if mark else ''}{problem}".split())
    if context:
        where = f" at {_at(context_mark, column_offset)}" if context_mark and context_mark is not mark else ""
        text += f" ({' '.join(context.split())}{where})"
    return text


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
