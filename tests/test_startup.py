"""`m3i train` starts without compiling anything: no DeepSpeed op is JIT-built on a fresh machine."""

import json
import subprocess
import sys

import pytest

from tests.helpers import shard_small, small_demo, train_env, write_train_config

pytestmark = pytest.mark.slow

# Runs `m3i train` as the console script does, with every way DeepSpeed and torch build a C++
# extension replaced by a recorder that fails the build. Imports m3i's training first (as
# `m3i train` does), then DeepSpeed's builders, so that the spies sit in place before any
# backend is set up.
DRIVER = r"""
import json, sys
calls = []
out = sys.argv[1]

def spy(name, real):
    def record(*args, **kwargs):
        calls.append(name)
        with open(out, "w") as f:
            json.dump(calls, f)
        raise RuntimeError(f"JIT build attempted: {name}")
    return record

import m3i.train.loop  # noqa: F401
import torch.utils.cpp_extension as cpp
from deepspeed.ops.op_builder.builder import OpBuilder
for attr in ("load", "load_inline", "_jit_compile"):
    setattr(cpp, attr, spy(f"torch.utils.cpp_extension.{attr}", getattr(cpp, attr)))
for attr in ("load", "jit_load"):
    setattr(OpBuilder, attr, spy(f"OpBuilder.{attr}", getattr(OpBuilder, attr)))
with open(out, "w") as f:
    json.dump(calls, f)
from m3i.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_training_starts_without_building_any_extension(tmp_path):
    shards = str(tmp_path / "shards")
    shard_small(small_demo(tmp_path / "raw"), shards)
    out = tmp_path / "run"
    cfg = write_train_config(tmp_path / "c.yaml", shards, str(out), train={"steps": 2}, checkpoint={"interval_steps": 2})
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = train_env()
    env.update(TORCH_EXTENSIONS_DIR=str(ext), XDG_CACHE_HOME=str(tmp_path / "cache"))
    calls = tmp_path / "calls.json"
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, str(calls), "-q", "train", "--config", str(cfg)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert json.loads(calls.read_text()) == [], r.stderr[-3000:]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert list(ext.iterdir()) == []  # nothing built, not even a lock file
    assert "built successfully" not in r.stdout + r.stderr
