"""P7: seconds from ``m3i train`` to its first training step, warm and on a "fresh machine".

    DS_ACCELERATOR=cpu python bench/startup_bench.py             # demo preset, 3 rounds
    python bench/startup_bench.py --repeats 5 --set data.num_workers=2

Each run is a new ``python -m m3i -q train --preset demo`` process (one rank, 1 step, on
the demo data set in a temporary folder, metrics endpoint off). Time to first step =
the ``time`` of step 1 in the run's ``history.jsonl`` (written when that step's optimizer
update is done) minus the moment the benchmark started the process; it covers the Python
imports, the loader and its worker, building the model, DeepSpeed's set-up and the step
itself. The process's whole wall time (which adds saving the final checkpoint) is shown too.

- warm: ``TORCH_EXTENSIONS_DIR`` and the cache folders as this shell has them (after one
  untimed run, so anything built or cached once is in place);
- fresh: a new, empty temporary folder for ``TORCH_EXTENSIONS_DIR``, ``XDG_CACHE_HOME``,
  ``TRITON_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR`` and ``MPLCONFIGDIR`` in every run, as on
  a machine (or a pod) that never ran training: whatever a start builds or caches, it pays.

Rounds interleave the two cases. The last line is ``P7 ratio <x>`` = median fresh / median
warm time to first step: 1.0 means a fresh machine starts as fast as a warm one. The
benchmark also lists what a fresh run left in its extensions folder (nothing, when no op
was compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import demo_counts, print_footer, print_header, print_table, workdir

from m3i.config import ShardConfig
from m3i.demo import make_demo_data
from m3i.shard import shard

FRESH_DIRS = {
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
    "XDG_CACHE_HOME": "cache",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "MPLCONFIGDIR": "matplotlib",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds of (warm, fresh) after one untimed warm run (default 3)")
    p.add_argument("--preset", default="demo", help="packaged preset of the runs (default demo)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="extra config override for every run (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds before a run counts as hung (default 600)")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and runs here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    return args


def _run(args: argparse.Namespace, shards: str, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the end of step 1, seconds of the whole process) of one ``m3i train``."""
    cmd = [
        sys.executable, "-m", "m3i", "-q", "train", "--preset", args.preset,
        "--set", f"data.shards={shards}", "--set", f"train.output={out}",
        "--set", "train.steps=1", "--set", "metrics.port=0", *[x for o in args.overrides for x in ("--set", o)],
    ]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    total = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    first = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    if first.get("step") != 1:
        raise RuntimeError(f"{out}/history.jsonl starts at step {first.get('step')}, not 1")
    return first["time"] - t0, total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_header("P7 start-up: m3i train to its first step, warm vs a fresh machine")
    base_env = dict(os.environ)
    base_env.setdefault("DS_ACCELERATOR", "cpu")
    base_env["OMP_NUM_THREADS"] = base_env.get("OMP_NUM_THREADS", "1")
    print(
        f"env:      DS_ACCELERATOR={base_env['DS_ACCELERATOR']} OMP_NUM_THREADS={base_env['OMP_NUM_THREADS']} "
        f"warm TORCH_EXTENSIONS_DIR={base_env.get('TORCH_EXTENSIONS_DIR', '(unset: ~/.cache/torch_extensions)')}"
    )
    with workdir(args.workdir, "m3i-bench-startup-") as work:
        counts = demo_counts(1)
        paths = make_demo_data(work / "raw", counts, seed=0)
        shards = str(work / "shards")
        shard(
            ShardConfig(
                out=shards, labelled=(paths["labelled"],), captions=(paths["captions"],),
                unlabelled=(paths["unlabelled"],), eval_labelled=(paths["eval"],), max_samples_per_shard=256,
            ),
            progress=False,
        )
        print(
            f"runs:     python -m m3i -q train --preset {args.preset} --set train.steps=1 --set metrics.port=0 "
            f"{' '.join('--set ' + o for o in args.overrides)} on the demo data ({counts.labelled + counts.captioned + counts.unlabelled} "
            f"train images); 1 untimed warm run, then {args.repeats} rounds of (warm, fresh)"
        )
        print()
        n = 0

        def next_out() -> Path:
            nonlocal n
            n += 1
            return work / "runs" / f"run-{n:02d}"

        _run(args, shards, next_out(), base_env)
        first: dict[str, list[float]] = {"warm": [], "fresh": []}
        total: dict[str, list[float]] = {"warm": [], "fresh": []}
        built: list[str] = []
        for _ in range(args.repeats):
            f, t = _run(args, shards, next_out(), base_env)
            first["warm"].append(f)
            total["warm"].append(t)
            with tempfile.TemporaryDirectory(prefix="m3i-fresh-", dir=work) as fresh:
                env = dict(base_env)
                for var, sub in FRESH_DIRS.items():
                    env[var] = str(Path(fresh) / sub)
                    Path(env[var]).mkdir()
                f, t = _run(args, shards, next_out(), env)
                first["fresh"].append(f)
                total["fresh"].append(t)
                ext = Path(env["TORCH_EXTENSIONS_DIR"])
                built += sorted(str(p.relative_to(ext)) for p in ext.iterdir())

    rows = []
    for case in ("warm", "fresh"):
        fs, ts = first[case], total[case]
        rows.append([
            case, f"{statistics.median(fs):.2f} ({min(fs):.2f}-{max(fs):.2f})", f"{statistics.median(ts):.2f}",
            " ".join(f"{x:.2f}" for x in fs),
        ])
    print_table(["case", "s to first step, median (min-max)", "process s, median", "each run"], rows)
    print()
    print(f"built into the fresh TORCH_EXTENSIONS_DIR: {sorted(set(built)) or 'nothing'}")
    print_footer()
    print(f"P7 ratio {statistics.median(first['fresh']) / statistics.median(first['warm']):.3f}")


if __name__ == "__main__":
    main()
