#!/usr/bin/env bash
# The GPU checks of issue #19 as one command, for a machine with a GPU and no network.
# Nothing is installed (such a machine cannot reach PyPI): it runs with the Python it finds and
# says what that Python lacks.
#
#   1. environment: the modules m3i needs, torch's CUDA and the device;
#   2. tests/test_precision.py on CUDA's own kernels (M3I_TEST_DEVICE=cuda): every branch
#      combination, mixing on and off, demo and default presets, bf16 and fp16 weights, no autocast;
#   3. `m3i train` on CUDA (in one process, demo preset, 30 steps): bf16 with ZeRO-2 under an outer
#      CUDA autocast, which DeepSpeed turns off inside its engine (the path that crashed at step 1
#      before #19), and fp16 with ZeRO 0 (loss scaling, overflow skips);
#   4. P8, bench/gpu_train_bench.py: images/s, MFU and peak memory of ViT-B/16 and of the default
#      preset, the figures for docs/benchmarks.md.
#
#   bash scripts/gpu-check.sh            # from anywhere; PYTHON=/path/to/python picks the interpreter
#
# Exit status: 0 when every step passed, else the number of the first step that failed
# (1: a module is missing or CUDA is unusable; both are listed).
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unset DS_ACCELERATOR  # the CUDA accelerator, whatever the calling shell had
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"

py="${PYTHON:-}"
if [ -z "$py" ]; then
    for candidate in "$root/.venv/bin/python" python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
    done
fi
if [ -z "$py" ]; then
    echo "gpu-check: no Python found; set PYTHON=/path/to/python" >&2
    exit 1
fi

echo "== 1. environment ($py)"
"$py" - <<'EOF' || exit 1
import importlib
import sys

# module -> what provides it (the versions pyproject.toml pins)
need = {
    "torch": "torch==2.14.1", "torchvision": "torchvision==0.29.1", "deepspeed": "deepspeed==0.19.8",
    "timm": "timm==1.0.31", "open_clip": "open-clip-torch==3.3.0", "yaml": "pyyaml", "safetensors": "safetensors",
    "prometheus_client": "prometheus-client==0.26.0", "tqdm": "tqdm", "PIL": "pillow", "numpy": "numpy",
    "minio": "minio==7.2.20", "pytest": "pytest==9.2.0",
}
missing = []
for module, package in need.items():
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        missing.append(f"  {package:28s} (import {module}: {type(e).__name__}: {e})")
if not missing:
    try:
        importlib.import_module("m3i.train.loop")
    except Exception as e:  # noqa: BLE001
        missing.append(f"  m3i's own imports failed: {type(e).__name__}: {e}")
if missing:
    print("gpu-check: this Python lacks what m3i needs (install with pip install -e '.[test]' where PyPI is reachable):")
    print("\n".join(missing))
    sys.exit(1)
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} built for CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    from m3i.train.dist import cuda_unusable_message, gather_device_facts

    print("gpu-check: " + cuda_unusable_message(gather_device_facts(), 0, "the GPU checks need CUDA"))
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv

echo "== 2. tests/test_precision.py on CUDA"
M3I_TEST_DEVICE=cuda timeout 300 "$py" -m pytest -q -p no:cacheprovider tests/test_precision.py || exit 2

echo "== 3. m3i train on CUDA (demo preset, 30 steps)"
timeout 300 "$py" - <<'EOF' || exit 3
import contextlib
import logging
import math
import statistics
import tempfile
from pathlib import Path

import torch

from m3i.config import ShardConfig, load_config
from m3i.demo import DemoCounts, make_demo_data
from m3i.shard import shard
from m3i.train.history import read_history
from m3i.train.loop import train

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
tmp = Path(tempfile.mkdtemp(prefix="m3i-gpu-check-"))
paths = make_demo_data(tmp / "raw", DemoCounts(labelled=256, captioned=192, unlabelled=128, eval=64), seed=0)
shard(ShardConfig(out=str(tmp / "shards"), labelled=(paths["labelled"],), captions=(paths["captions"],),
                  unlabelled=(paths["unlabelled"],), eval_labelled=(paths["eval"],), max_samples_per_shard=128, workers=1),
      progress=False)
cases = {
    "bf16 ZeRO-2, outer CUDA autocast": (["train.precision=bf16", "train.zero_stage=2", "train.overlap_comm=true"], True),
    "fp16 ZeRO-0": (["train.precision=fp16", "train.zero_stage=0"], False),
}
for name, (sets, outer) in cases.items():
    out = tmp / name.split()[0]
    cfg = load_config("demo", overrides=[f"data.shards={tmp / 'shards'}", f"train.output={out}", "train.steps=30",
                                         "train.device=cuda", "checkpoint.interval_steps=1000", "metrics.port=0", *sets])
    outer_autocast = torch.autocast("cuda", dtype=torch.bfloat16) if outer else contextlib.nullcontext()
    with outer_autocast:
        summary = train(cfg, progress=False)
    rows = read_history(str(out))
    assert summary.steps == 30 and len(rows) == 30, (summary.steps, len(rows))
    assert all(math.isfinite(r["loss"]) for r in rows), [r["loss"] for r in rows]
    step_ms = statistics.median(r["step_seconds"] for r in rows[5:]) * 1e3
    print(f"{name}: 30 steps, {summary.overflow_steps} overflow steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
          f"median step {step_ms:.1f} ms, max allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
EOF

echo "== 4. P8: bench/gpu_train_bench.py (ViT-B/16 and --preset default)"
timeout 420 "$py" bench/gpu_train_bench.py || exit 4
echo "gpu-check: all steps passed"
