"""The offline deployment linters: helm, hadolint, checkov (``scripts/install-k8s-tools.sh``).

    from tests.k8s_tools import tool, checkov_failures
    subprocess.run([tool("helm"), "lint", "helm/m3i"], check=True)
    assert checkov_failures(["-d", "manifests"], "kubernetes", SKIPS) == []

A missing tool fails the test with the command that installs it: these tests are part
of CI and are never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["ROOT", "TOOLS", "tool", "tool_env", "checkov_failures"]

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".cache" / "tools" / "bin"


def tool(name: str) -> str:
    """Absolute path of ``name`` from ``.cache/tools/bin`` (preferred) or PATH."""
    local = TOOLS / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise AssertionError(f"{name} is not installed: run scripts/install-k8s-tools.sh (installs into {TOOLS})")


def tool_env() -> dict[str, str]:
    """The environment for the tools: ``.cache/tools/bin`` first on PATH, helm's state inside ``.cache``."""
    env = dict(os.environ)
    env["PATH"] = f"{TOOLS}{os.pathsep}{env.get('PATH', '')}"
    helm_home = ROOT / ".cache" / "helm"
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        env[var] = str(helm_home / sub)
    return env


def checkov_failures(target: list[str], framework: str, skips: dict[str, str]) -> list[str]:
    """Run checkov offline and return its failed checks as ``CHECK_ID resource (file): name`` lines.

    Args:
        target: What to scan, e.g. ``["-d", "manifests"]`` or ``["-f", "docker/Dockerfile"]``.
        framework: checkov framework: ``kubernetes``, ``kustomize``, ``helm`` or ``dockerfile``.
        skips: Check id -> why it does not apply; every skip must say why.
    """
    for check, why in skips.items():
        assert why.strip(), f"checkov skip {check} needs a reason"
    cmd = [tool("checkov"), *target, "--framework", framework, "--skip-download", "--output", "json", "--quiet", "--compact"]
    if skips:
        cmd += ["--skip-check", ",".join(sorted(skips))]
    proc = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout.strip()
    if not out:
        raise AssertionError(f"checkov printed nothing (exit {proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(out)
    reports = data if isinstance(data, list) else [data]
    failed: list[str] = []
    scanned = 0
    for report in reports:
        if not isinstance(report, dict) or "results" not in report:
            continue  # an empty scan prints a summary dict without results
        scanned += report.get("summary", {}).get("resource_count", 0)
        for c in report["results"].get("failed_checks", []):
            failed.append(f"{c['check_id']} {c.get('resource', '?')} ({c.get('file_path', '?')}): {c.get('check_name', '')}")
    assert scanned > 0, f"checkov scanned no resources in {target} ({framework}): {out[:500]}"
    return failed
