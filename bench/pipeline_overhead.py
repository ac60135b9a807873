"""P5: what running the stages as the KFP pipeline (kfp.local) costs over calling them directly.

    python bench/pipeline_overhead.py --steps 10

Both runs write the same demo data and use the same preset and arguments, one after the
other in this command: first every stage of ``m3i.pipeline.steps`` called in this process (plan,
shard, train through torchx with 2 processes, export, evaluate), then the whole
``m3i-pretrain`` pipeline through ``kfp.local`` (each component a subprocess; artifacts
passed as files). Each writes to a store of its own so nothing is reused. Ratio =
pipeline seconds / direct seconds; the difference is the orchestration cost (a Python
start and imports per step, executor input/output files).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import print_footer, print_header, print_ratio, print_table

from m3i.demo import make_demo_data
from m3i.pipeline import steps
from m3i.pipeline.local import DEMO_ARGUMENTS, run_local


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="training steps of each run (default: %(default)s)")
    return p.parse_args()


def direct(root: Path, n_steps: int) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.monotonic()
    raw = make_demo_data(root / "raw")  # run_local writes its demo data too: both runs pay for it
    times["demo data"] = time.monotonic() - t
    sources = {"labelled": [raw["labelled"]], "captions": [raw["captions"]], "unlabelled": [raw["unlabelled"]], "eval_labelled": [raw["eval"]]}
    store = str(root / "store")
    t = time.monotonic()
    plan = steps.plan_dataset(sources, store, preset="demo")
    times["plan"] = time.monotonic() - t
    t = time.monotonic()
    data = steps.shard_dataset(sources, plan["dataset_uri"], preset="demo")
    times["shard"] = time.monotonic() - t
    t = time.monotonic()
    run = steps.train_model(data["uri"], steps.run_uri(store, "runs", "direct"), steps=n_steps, run_id="direct", preset="demo")
    times["train"] = time.monotonic() - t
    t = time.monotonic()
    model = steps.export_model(run["checkpoint"], steps.run_uri(store, "models"), name="m3i", preset="demo")
    times["export"] = time.monotonic() - t
    t = time.monotonic()
    steps.evaluate_model(model["uri"], data["uri"], steps.run_uri(store, "evals", "direct"), preset="demo")
    times["evaluate"] = time.monotonic() - t
    return times


def main() -> None:
    args = parse_args()
    print_header("P5: kfp.local pipeline run vs the same stages called directly")
    print(f"arguments: preset demo, {args.steps} training steps, 2 training processes, {DEMO_ARGUMENTS['launcher']} launcher")
    with tempfile.TemporaryDirectory(prefix="m3i-bench-pipeline-") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        parts = direct(root / "direct", args.steps)
        direct_s = time.monotonic() - t0
        t0 = time.monotonic()
        r = run_local(root / "pipeline", arguments={"steps": args.steps}, run_name="bench")
        pipeline_s = time.monotonic() - t0
    rows = [[k, f"{v:.1f}"] for k, v in parts.items()]
    rows.append(["direct total", f"{direct_s:.1f}"])
    rows.append(["pipeline (kfp.local) total", f"{pipeline_s:.1f} (kfp.local reports {r.seconds:.1f})"])
    print_table(["stage", "seconds"], rows)
    print(f"orchestration cost: {pipeline_s - direct_s:+.1f} s over {len(parts) - 1} pipeline steps")
    print_ratio("pipeline_over_direct", pipeline_s / direct_s)
    print_footer()


if __name__ == "__main__":
    main()
