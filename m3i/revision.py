"""Which code a run, a checkpoint or an exported model came from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["code_revision"]


def code_revision() -> str:
    """The code revision of this m3i: ``M3I_CODE_REVISION`` (set in images), else git's HEAD, else ``unknown``."""
    env = os.environ.get("M3I_CODE_REVISION", "").strip()
    if env:
        return env
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an installed wheel: no repository of its own
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
