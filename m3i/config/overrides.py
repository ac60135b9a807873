"""Typed overrides inside a process; ``--set`` text only where another process starts.

A command or a pipeline step that sets config values gives them as Python values keyed by
``section.key`` (``{"train.steps": 5, "data.shards": uri}``): :func:`m3i.config.load_config`
(``values=``) and :func:`m3i.config.with_values` check them as a ``--set`` is checked, by the same
coercion and the same messages naming the key. Only at a process or pod boundary (a training
rank, a Kubernetes job, an experiment's ``m3i train`` run) do they become text:
:func:`override_strings` writes ``section.key=value`` that :func:`m3i.config.yaml_text.parse_override`
reads back as the same value, and :func:`command_line` the whole ``--preset/--config/--set``
argument list that :func:`m3i.config.load_config` takes (the parser is ``m3i.cli_args.config_args``).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import yaml

from m3i.config.messages import shown
from m3i.config.yaml_text import set_path

__all__ = ["command_line", "flat_values", "override_strings", "set_values"]


def set_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested plain dict ``data`` with each ``section.key`` of ``values`` set (as ``--set`` sets it).

    Raises:
        ValueError: A key that is empty or not a string, or one whose path crosses a value (naming the key).
    """
    out = copy.deepcopy(dict(data))
    for key, value in values.items():
        parts = [p for p in key.split(".") if p] if isinstance(key, str) else []
        if not parts:
            raise ValueError(f"override key {shown(key)} must look like section.key")
        set_path(out, parts, _plain(value), f"override {key}={shown(value)}")
    return out


def flat_values(sections: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (a config file's sections) as ``{"section.key": value}``, mappings walked into.

    An empty mapping gives no key (it sets nothing), as a file that names a section and no key.
    """
    out: dict[str, Any] = {}
    for k, v in sections.items():
        if isinstance(v, Mapping):
            out.update(flat_values(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def override_strings(values: Mapping[str, Any]) -> list[str]:
    """``section.key=<YAML>`` for each value, text that ``--set`` reads back as the same value.

    Strings YAML would read as something else (``true``, ``0x10``, ``''``, ``a: b``) come quoted;
    lists and mappings in flow style; tuples as lists.
    """
    return [f"{key}={_yaml_text(value)}" for key, value in values.items()]


def command_line(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> list[str]:
    """The ``--preset/--config/--set`` arguments that load the config :func:`m3i.config.load_config` would build
    from the same inputs (``values`` after ``overrides``, so they win)."""
    out = ["--preset", preset] if preset else []
    out += ["--config", str(config_file)] if config_file else []
    for item in [*overrides, *override_strings(values or {})]:
        out += ["--set", item]
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts, paths as text: the plain data a YAML file or a ``--set`` gives."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml_text(value: Any) -> str:
    # One flow-style YAML document without its end marker; the width keeps long values on one line.
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()
