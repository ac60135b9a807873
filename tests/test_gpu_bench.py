"""bench/gpu_train_bench.py (P8) cannot rot: its --tiny mode runs the same code on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import train_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_tiny_on_the_cpu_and_prints_its_figures():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_train_bench.py"), "--tiny"],
        env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("# P8:")
    head = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines if re.match(r"^[a-z]+: ", line)}
    assert {"command", "date", "git", "loadavg", "device", "config", "steps", "flops", "peak"} <= head.keys()
    assert "bf16, ZeRO-2, overlap_comm True" in head["config"]  # the default preset's engine settings
    assert head["peak"].startswith("unknown for 'cpu'") and "H100 989.4" in head["peak"]
    rows = {}
    for line in lines:
        m = re.match(r"^\| (plain_vit|m3i_default) \| ([\d.]+)M \| ([\d.]+) ms \(.*\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| n/a \| n/a \(CPU\) \|$", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.groups()[1:]]
    assert rows.keys() == {"plain_vit", "m3i_default"}, r.stdout
    for params, step_ms, images, tflop, achieved in rows.values():
        assert params > 0 and step_ms > 0 and images > 0 and tflop > 0 and achieved > 0
    assert rows["m3i_default"][0] > rows["plain_vit"][0]  # the M3I model trains more than its backbone
    m = re.fullmatch(r"P8 ratio (\d+\.\d+)", lines[-1])
    assert m and float(m.group(1)) > 0, lines[-1]
