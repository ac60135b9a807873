"""Validate rendered Kubernetes objects against CRD OpenAPI schemas, offline and strictly.

    from tests.k8s_schema import assert_valid
    assert_valid(job, "batch.volcano.sh_jobs.yaml")            # from tests/data/crds/

A CRD's ``openAPIV3Schema`` never sets ``additionalProperties: false``, so plain
jsonschema lets a misspelled field through (an API server would prune or reject it).
``strict=True`` adds it to every object node that lists ``properties`` and neither sets
``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``. CEL rules
(``x-kubernetes-validations``), list/map types and defaults are not checked.

Core kinds (Pod, Deployment, ...) are better checked with ``kubernetes-validate --strict``;
see :func:`validate_core`.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

__all__ = ["CRDS", "assert_valid", "crd_schema", "errors", "strict_schema", "validate_core"]

CRDS = Path(__file__).parent / "data" / "crds"
"""The CRD files kept as test data (see its README for their provenance)."""

_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` whose object nodes reject properties they do not list."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        props = node.get("properties")
        if isinstance(props, dict):
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for sub in props.values():
                walk(sub)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])
        items = node.get("items")
        for sub in items if isinstance(items, list) else [items]:
            walk(sub)
        for key in _SUBSCHEMA_LISTS:
            for sub in node.get(key, []):
                walk(sub)
        walk(node.get("not"))

    walk(out)
    return out


@functools.lru_cache(maxsize=None)
def _load_crd(path: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        crd = yaml.load(f, Loader=loader)
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{path} is not a CustomResourceDefinition")
    return crd


@functools.lru_cache(maxsize=None)
def _validator(path: str, api_version: str, kind: str, strict: bool) -> jsonschema.Draft7Validator:
    crd = _load_crd(path)
    group, _, version = api_version.rpartition("/")
    spec = crd["spec"]
    if (group, kind) != (spec["group"], spec["names"]["kind"]):
        raise ValueError(f"{api_version} {kind} does not match CRD {spec['group']} {spec['names']['kind']} ({path})")
    versions = {v["name"]: v for v in spec["versions"]}
    if version not in versions:
        raise ValueError(f"{path} serves no version {version!r}; it has {sorted(versions)}")
    schema = versions[version]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict_schema(schema) if strict else schema)


def crd_schema(crd: str | Path, api_version: str, kind: str, *, strict: bool = True) -> dict[str, Any]:
    """The (strict) ``openAPIV3Schema`` of one version of a CRD file."""
    return _validator(str(_resolve(crd)), api_version, kind, strict).schema


def _resolve(crd: str | Path) -> Path:
    path = Path(crd)
    return path if path.is_absolute() or path.exists() else CRDS / path


def errors(obj: dict[str, Any], crd: str | Path, *, strict: bool = True) -> list[str]:
    """Every schema violation of ``obj`` as ``path: message`` lines (empty when valid).

    Args:
        obj: The object, with ``apiVersion`` and ``kind``.
        crd: A CRD file: a path, or a file name in :data:`CRDS`.
        strict: Also reject fields the schema does not list.
    """
    validator = _validator(str(_resolve(crd)), obj["apiVersion"], obj["kind"], strict)

    def lines() -> Iterator[str]:
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            where = ".".join(map(str, e.absolute_path)) or "<root>"
            yield f"{where}: {e.message}"

    return list(lines())


def assert_valid(obj: dict[str, Any], crd: str | Path, *, strict: bool = True) -> None:
    """Fail with every violation listed unless ``obj`` satisfies the CRD's schema."""
    found = errors(obj, crd, strict=strict)
    assert not found, f"{obj['kind']} violates {Path(crd).name}:\n  " + "\n  ".join(found)


def validate_core(obj: dict[str, Any], version: str = "1.37.0") -> None:
    """Validate a core-kind object (e.g. a Pod) with ``kubernetes-validate --strict``.

    Raises:
        kubernetes_validate.ValidationError: With the first violation.
    """
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)
