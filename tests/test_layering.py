"""The house's floors, asserted over the code's own imports (issue #21; the plan is /work/notes/REDESIGN.md).

Every ``.py`` file under ``m3i/`` is parsed (nothing is imported) and every import in it counts:
module level, inside functions, under ``TYPE_CHECKING``. A module may import its own floor's
peers and the floors below; the stages import only stages before them in pipeline order; no two
files import each other.

Floors, bottom to top::

    0 ground     m3i/__init__.py, m3i/config, m3i/storage, m3i/revision.py, m3i/text.py
    1 artifacts  m3i/artifacts (the read layer: file names and layouts of every artifact)
    2 libraries  m3i/models, m3i/losses, m3i/transforms, m3i/data, m3i/metrics, m3i/launch, m3i/demo.py
    3 stages     m3i/shard < m3i/train < m3i/export < m3i/evaluate < m3i/promote
    4 pipeline   m3i/pipeline
    5 commands   m3i/cli.py, m3i/__main__.py, every per-command ``cli.py`` and m3i/cli_args.py (their one vocabulary)

``KNOWN`` lists the violations the redesign has not removed yet, each with the engineer and the
reason; it only shrinks. An entry that no longer occurs fails the test too, so it is removed the
moment its cause is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "m3i"

GROUND = {"m3i", "m3i.config", "m3i.storage", "m3i.revision", "m3i.text"}
LIBRARIES = {"m3i.models", "m3i.losses", "m3i.transforms", "m3i.data", "m3i.metrics", "m3i.launch", "m3i.demo"}
STAGES = ("m3i.shard", "m3i.train", "m3i.export", "m3i.evaluate", "m3i.promote")
"""Pipeline order: a stage imports only the ones before it."""
FLOOR_NAMES = {0: "ground", 1: "artifacts", 2: "libraries", 3: "stages", 4: "pipeline", 5: "commands"}

KNOWN: dict[tuple[str, str], str] = {
    # (importer, imported): who removes it and why it is still there. Remove an entry with the import it names.
}
KNOWN_PACKAGES: dict[tuple[str, str], str] = {
    # (package, package): who removes it and why. Same rule: only shrinks.
}


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every file under ``m3i/``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(source: str, name: str, is_package: bool = False) -> set[str]:
    """The ``m3i`` modules that the source of module ``name`` imports anywhere (the most specific module named)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, is_package, node)
            # ``from m3i.train import loop`` imports the module m3i.train.loop; ``import X`` of a name, the package.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]  # ``import m3i.x.y.z`` of an attribute path: its module
            if t in MODULES and t != name and t.split(".")[0] == "m3i":
                found.add(t)
    return found


def imports_of(name: str) -> set[str]:
    """:func:`imports_in` of module ``name``'s file."""
    path = MODULES[name]
    return imports_in(path.read_text(), name, path.name == "__init__.py")


def _within(name: str, packages: set[str] | tuple[str, ...]) -> str | None:
    return next((p for p in packages if name == p or name.startswith(p + ".")), None)


def floor_of(name: str) -> int:
    """The floor of module ``name`` (see the module docstring); ``ValueError`` for a file no floor holds."""
    if name in ("m3i.cli", "m3i.cli_args", "m3i.__main__") or name.endswith(".cli"):
        return 5
    if _within(name, {"m3i.pipeline"}):
        return 4
    if _within(name, STAGES):
        return 3
    if _within(name, LIBRARIES):
        return 2
    if _within(name, {"m3i.artifacts"}):
        return 1
    if name == "m3i" or _within(name, GROUND - {"m3i"}):
        return 0
    raise ValueError(f"{name} is on no floor: give it one in tests/test_layering.py (and REDESIGN.md) or move it")


def _stage(name: str) -> int | None:
    found = _within(name, STAGES)
    return STAGES.index(found) if found else None


def why_not(importer: str, imported: str) -> str:
    """Why ``importer`` may not import ``imported``; ``""`` when it may."""
    a, b = floor_of(importer), floor_of(imported)
    if b > a:
        return f"floor {a} ({FLOOR_NAMES[a]}) imports floor {b} ({FLOOR_NAMES[b]})"
    if a == b == 3 and _stage(imported) > _stage(importer):
        return f"stage {STAGES[_stage(importer)]} imports the later stage {STAGES[_stage(imported)]}"
    return ""


GRAPH = {name: imports_of(name) for name in MODULES}


def _violations() -> dict[tuple[str, str], str]:
    found = {}
    for importer, targets in GRAPH.items():
        for imported in targets:
            why = why_not(importer, imported)
            if why:
                found[(importer, imported)] = why
            if importer < imported and importer in GRAPH.get(imported, ()):
                found[(importer, imported)] = f"{importer} and {imported} import each other"
    return found


def _package(name: str) -> str:
    """The top-level room of a module: ``m3i.train`` for ``m3i.train.loop``, ``m3i.cli`` for ``m3i.cli``."""
    return ".".join(name.split(".")[:2])


def _package_cycles() -> dict[tuple[str, str], str]:
    edges: dict[str, set[str]] = {}
    for importer, targets in GRAPH.items():
        for imported in targets:
            if _package(importer) != _package(imported):
                edges.setdefault(_package(importer), set()).add(_package(imported))
    return {
        (a, b): f"{a} and {b} import each other"
        for a in edges for b in edges[a] if a < b and a in edges.get(b, ())
    }


def test_every_file_is_on_a_floor():
    for name in MODULES:
        floor_of(name)  # raises naming the file


def test_no_import_goes_up_a_floor_or_back_a_stage_and_no_two_files_import_each_other():
    found = _violations()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "imports against the floors (fix them; KNOWN only shrinks):\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in sorted(new.items())
    )


def test_no_two_rooms_import_each_other():
    """Peers on one floor may import each other's modules, but not both ways (a hidden loop across rooms)."""
    new = {k: v for k, v in _package_cycles().items() if k not in KNOWN_PACKAGES}
    assert not new, "rooms importing each other:\n" + "\n".join(f"  {why}" for why in sorted(new.values()))


def test_known_violations_still_exist():
    """An allow-list entry whose import is gone must go too, so the lists only shrink."""
    gone = sorted(k for k in KNOWN if k not in _violations()) + sorted(k for k in KNOWN_PACKAGES if k not in _package_cycles())
    assert not gone, f"remove these from KNOWN / KNOWN_PACKAGES in tests/test_layering.py, their imports are gone: {gone}"


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("m3i.train.loop", "m3i.artifacts.run", True),
        ("m3i.artifacts.checkpoint", "m3i.storage", True),
        ("m3i.artifacts.checkpoint", "m3i.models", False),
        ("m3i.train.loop", "m3i.evaluate", False),
        ("m3i.export.exporter", "m3i.train.history", True),
        ("m3i.shard", "m3i.train", False),
        ("m3i.pipeline.steps", "m3i.promote", True),
        ("m3i.promote.run", "m3i.pipeline.steps", False),
        ("m3i.models", "m3i.data", True),
        ("m3i.cli", "m3i.pipeline.cli", True),
        ("m3i.launch.cli", "m3i.cli_args", True),
        ("m3i.pipeline.steps", "m3i.cli_args", False),
        ("m3i.config", "m3i.cli_args", False),
    ],
)
def test_the_rule_itself(importer, imported, allowed):
    """The rule, on pairs whose answer is known (so a broken floor table cannot pass everything)."""
    assert (why_not(importer, imported) == "") is allowed


def test_the_reader_sees_imports_inside_functions_relative_ones_and_submodules():
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from .checkpoint import Checkpointer\n"
        "from m3i.train import loop\n"
        "import m3i.storage.base\n"
        "if TYPE_CHECKING:\n"
        "    from m3i.export import ExportResult\n"
        "def f():\n"
        "    from m3i.artifacts.checkpoint import find_latest\n"
        "    import torch\n"
    )
    assert imports_in(source, "m3i.train.init_from") == {
        "m3i.train.checkpoint", "m3i.train.loop", "m3i.storage.base", "m3i.export", "m3i.artifacts.checkpoint",
    }
    assert imports_in("from . import loop\nfrom .. import artifacts\n", "m3i.train", is_package=True) == {"m3i.train.loop", "m3i.artifacts"}
