"""Compile ``m3i-pretrain`` to KFP IR YAML and name its versions.

    compile_pipeline("m3i/pipeline/m3i-pretrain.yaml")     # what `m3i pipeline compile` writes
    version_name()                                          # "0.1.0-6505f9e1a2b3"

The compiled YAML is kept under version control as package data (``packaged_pipeline()``),
so an installed m3i (the images, the Helm hook) uploads exactly the reviewed pipeline; a
test fails when it is stale. It holds no version name and no revision, only what the
source determines; the version name is given at upload.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from m3i import __version__
from m3i.pipeline import PIPELINE_NAME
from m3i.revision import code_revision

__all__ = ["compile_pipeline", "packaged_pipeline", "pipeline_sha256", "version_name", "SOURCE_PIPELINE"]

SOURCE_PIPELINE = Path(__file__).with_name(f"{PIPELINE_NAME}.yaml")
"""Where the compiled pipeline lives in the source tree (and, as package data, in an install)."""


def compile_pipeline(out: str | os.PathLike = SOURCE_PIPELINE) -> Path:
    """Compile the pipeline of ``components/`` to IR YAML at ``out``; returns the path."""
    from kfp import compiler

    from m3i_components.pipeline import m3i_pretrain

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then rename: a reader never sees half a pipeline.
    fd, tmp = tempfile.mkstemp(prefix=".m3i-pipeline-", suffix=".yaml", dir=out.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline_func=m3i_pretrain, package_path=tmp)
        Path(tmp).write_text(_stable_header(Path(tmp).read_text()))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_DEFAULT = re.compile(r"^(#\s+\w+: \w+ \[Default: )(.*)(\])$")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _stable_header(text: str) -> str:
    """The compiler's comment header prints dict defaults in hash order: print them sorted.

    Without this, two compiles of the same source differ and the staleness test flaps.
    """
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        m = _DEFAULT.match(line)
        if m and m.group(2)[:1] in "[{":
            lines[i] = m.group(1) + repr(_sorted(ast.literal_eval(m.group(2)))) + m.group(3)
    return "\n".join(lines)


def packaged_pipeline() -> Path:
    """The compiled pipeline shipped with this m3i."""
    path = Path(str(resources.files("m3i.pipeline").joinpath(f"{PIPELINE_NAME}.yaml")))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `m3i pipeline compile` (and commit the result)")
    return path


def pipeline_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def version_name(package: str | os.PathLike | None = None, revision: str | None = None) -> str:
    """``<package version>-<revision12>``: the KFP pipeline version name of this code.

    A revision with uncommitted changes (or none known) gets ``-<sha8 of the YAML>`` so two
    different pipelines never share a name.
    """
    rev = revision if revision is not None else code_revision()
    base, _, dirty = rev.partition("+")
    name = f"{__version__}-{base[:12]}"
    if dirty or base == "unknown":
        name += f"-{pipeline_sha256(package or packaged_pipeline())[:8]}"
    return name
