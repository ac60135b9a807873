"""Config text: YAML files and presets into sections, and ``--set section.key=value`` overrides.

Every problem is one line naming where it is (file, line, column) and what was expected: a
syntax error, a top level or section that is not a mapping, a key that is not a string or is
given twice, a value YAML cannot build, and a YAML tag (``!!python/object/apply:...``,
``!custom``), which is refused by name wherever it stands: m3i reads plain data only.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import yaml

from m3i.config.messages import shown

__all__ = ["apply_overrides", "parse_override", "read_yaml_sections", "set_path"]

_TAG = "tag:yaml.org,2002:"
# What PyYAML's safe loader builds (plain data), plus the merge key ``<<``; any other tag is refused.
_PLAIN_TAGS = frozenset({*(t for t in yaml.SafeLoader.yaml_constructors if t), _TAG + "merge"})
_NO_CONSTRUCTOR = re.compile(r"could not determine a constructor for the tag '(.*)'", re.S)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` into (path, YAML-parsed value).

    A value that is not valid YAML is taken as plain text (``--set train.run_id=@nightly``),
    unless it starts as a YAML list, mapping or quoted string (``[``, ``{``, ``"``, ``'``):
    then it was meant as YAML and is refused. A YAML tag (``!!python/...``, ``!name``) is refused
    by name wherever it stands; quoting the value keeps it text.

    Raises:
        ValueError: No ``=``, an empty key, a YAML tag, or a list, mapping or quoted value that does not parse.
    """
    if "=" not in text:
        raise ValueError(f"--set {shown(text)} must look like section.key=value")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ValueError(f"--set {shown(text)} has an empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""  # the safe loader, naming a value it cannot build
    except (yaml.YAMLError, RecursionError) as e:
        tagged = isinstance(e, yaml.constructor.ConstructorError) and _NO_CONSTRUCTOR.search(str(e.problem))
        if raw.strip()[:1] not in ("[", "{", '"', "'") and not tagged:
            value = raw
        else:
            problem = _yaml_problem(e, column_offset=len(path) + 1)
            raise ValueError(f"--set {shown(text)}: the value is not valid YAML: {problem}") from None
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
        if root is not None:
            _check_tags(root, origin)
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
                    f"{origin}: {_at(value_node.start_mark)}: section {shown(key_node.value)} is {_node_kind(value_node)}; "
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
                None, None, f"cannot read {shown(node.value)} as a {node.tag.removeprefix(_TAG)} ({e}); quote it to keep it text",
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
    return f"the {'string' if kind == 'str' else kind} {shown(node.value)}"


def _check_tags(root: Any, origin: str) -> None:
    """Every node under ``root`` is plain data: a tag the safe loader cannot build is named, where it stands.

    Without this a tagged node (``train: !!python/object/apply:os.system [ls]``) would first be
    judged by its shape ("section 'train' is a list"). Iterative, so no nesting depth can fail it.
    """
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:  # an alias: checked where its anchor is
            continue
        seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            raise ValueError(f"{origin}: {_at(node.start_mark)}: {_tag_problem(node.tag)}")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))


def _tag_problem(tag: str) -> str:
    short = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
    return (
        f"the YAML tag {shown(short)} is not allowed; expected plain YAML (mappings, lists, strings, numbers, "
        "booleans): m3i builds no Python objects and reads no custom tags, so remove the tag (or quote a value meant as text)"
    )


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
            text = shown(key_node.value) if isinstance(key_node, yaml.ScalarNode) else ""
            raise ValueError(
                f"{origin}: {_at(key_node.start_mark)}: key {text + ' ' if text else ''}is {_node_kind(key_node)}; "
                "expected a name (quote it if it must look like a number, boolean or null)"
            )
        elif key_node.value in first:
            raise ValueError(
                f"{origin}: {_at(key_node.start_mark)}: key {shown(key_node.value)} is given twice "
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
    elif _NO_CONSTRUCTOR.search(problem):
        problem, context = _tag_problem(_NO_CONSTRUCTOR.search(problem).group(1)), None
    text = " ".join(f"{_at(mark, column_offset) + ': ' if mark else ''}{problem}".split())
    if context:
        where = f" at {_at(context_mark, column_offset)}" if context_mark and context_mark is not mark else ""
        text += f" ({' '.join(context.split())}{where})"
    return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of a nested dict with each ``a.b.c=value`` override set."""
    out = copy.deepcopy(data)  # plain data from YAML (a dump-and-load copy took 30 s for 300k keys)
    for text in overrides:
        parts, value = parse_override(text)
        set_path(out, parts, value, f"--set {shown(text)}")
    return out


def set_path(tree: dict[str, Any], parts: Sequence[str], value: Any, what: str) -> None:
    """``tree[parts[0]]...[parts[-1]] = value``, making sections on the way.

    Raises:
        ValueError: When a part on the way is a value, not a section; ``what`` names the override.
    """
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{what}: {shown(p)} is a value, not a section")
        node = nxt
    node[parts[-1]] = value
