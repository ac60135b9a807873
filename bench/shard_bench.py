"""P1: shard-writing throughput of ``m3i.shard.shard`` against GNU ``tar -cf`` on the same files.

    python bench/shard_bench.py                  # standard demo counts, 3 repeats
    python bench/shard_bench.py --scale 4 --repeats 5

The inputs are the demo data set (``m3i.demo.make_demo_data``) in a temporary folder,
read from the page cache by both sides. Each measurement writes into a fresh output
folder; the figure is the median of ``--repeats`` runs. A last line re-runs ``shard``
over an existing output: the resume path, which should skip every unit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _common import (
    TIME_HEADERS,
    Timing,
    input_files,
    make_inputs,
    print_footer,
    print_header,
    workdir,
    print_ratio,
    print_table,
    time_runs,
)

from m3i.config import ShardConfig
from m3i.shard import ShardIndex, shard

KINDS = ("labelled", "captioned", "unlabelled", "eval")
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1, help="multiply every demo image count by N (default 1: standard counts)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported (default 3)")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[1, 0], help="shard.workers values to measure; 0 = every core (default: 1 0)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    if any(w < 0 for w in args.workers):
        p.error(f"--workers={args.workers}: each must be >= 0 (0 = every core)")
    return args


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_header("P1 shard-writing throughput: m3i.shard.shard vs GNU tar -cf")
    with workdir(args.workdir, "m3i-bench-shard-") as work:
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    paths = make_inputs(work / "raw", args.scale)
    root = Path(paths["root"])
    images = input_files(root, KINDS)
    members = [*KINDS, Path(paths["captions"]).name]
    in_bytes = sum(p.stat().st_size for p in images) + Path(paths["captions"]).stat().st_size
    n_images = len(images)
    cores = len(os.sched_getaffinity(0))
    tar_version = subprocess.run(["tar", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    print(f"tar:      {tar_version}")
    print(
        f"measured: {n_images} images, {in_bytes / MB:.1f} MB of input files; median of {args.repeats} runs, "
        "each into a fresh output folder"
    )
    print()

    outs = work / "out"

    def fresh(name: str) -> Path:
        path = outs / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    # -- tar ----------------------------------------------------------------
    def tar_run(i: int) -> None:
        dest = fresh("tar") / "all.tar"
        dest.parent.mkdir(parents=True)
        subprocess.run(["tar", "-cf", str(dest), "-C", str(root), *members], check=True)
        _fsync(dest)  # m3i fsyncs each object it writes; so does this side

    tar_t = time_runs(tar_run, args.repeats)
    tar_out = (outs / "tar" / "all.tar").stat().st_size

    # -- m3i ------------------------------------------------------------------
    def cfg(out: Path, workers: int) -> ShardConfig:
        return ShardConfig(
            out=str(out),
            labelled=(paths["labelled"],),
            captions=(paths["captions"],),
            unlabelled=(paths["unlabelled"],),
            eval_labelled=(paths["eval"],),
            workers=workers,
        )

    results: list[tuple[str, int, Timing, int, ShardIndex]] = []
    last: dict[str, object] = {}
    for w in args.workers:
        name = f"m3i-w{w}"

        def m3i_run(i: int, w: int = w, name: str = name) -> None:
            out = fresh(name)
            last["out"], last["workers"] = out, w
            last["index"] = shard(cfg(out, w), progress=False)

        t = time_runs(m3i_run, args.repeats)
        index: ShardIndex = last["index"]  # type: ignore[assignment]
        samples = index.raw["totals"]["samples"]
        if samples != n_images:
            raise RuntimeError(f"{name}: the index holds {samples} samples, the inputs {n_images} images")
        out_bytes = sum(s.bytes for shards in index.splits.values() for s in shards)
        results.append((name, w, t, out_bytes, index))

    # -- re-run over the last output: every unit verified and skipped ------------
    rerun_out, rerun_w = last["out"], last["workers"]
    reruns: list[dict] = []

    def rerun(i: int) -> None:
        reruns.append(shard(cfg(rerun_out, rerun_w), progress=False).raw["run"])  # type: ignore[arg-type]

    rerun_t = time_runs(rerun, args.repeats)
    written = sum(r["units_written"] for r in reruns)
    if written:
        raise RuntimeError(f"the re-run wrote {written} units; it should have reused all of them")

    def workers_label(w: int) -> str:
        return f"{w} (all {cores} cores)" if w == 0 else str(w)

    rows = [["GNU tar -cf (+ fsync)", "1", n_images, *tar_t.cells(), f"{n_images / tar_t.median:,.0f}",
             f"{in_bytes / MB / tar_t.median:,.1f}", f"{tar_out / MB:.1f}"]]
    for name, w, t, out_bytes, index in results:
        rows.append(["m3i shard", workers_label(w), n_images, *t.cells(), f"{n_images / t.median:,.0f}",
                     f"{in_bytes / MB / t.median:,.1f}", f"{out_bytes / MB:.1f}"])
    units = reruns[-1]["units_reused"]
    rows.append([f"m3i shard re-run ({units} units reused)", workers_label(rerun_w), n_images, *rerun_t.cells(),
                 f"{n_images / rerun_t.median:,.0f}", f"{in_bytes / MB / rerun_t.median:,.1f}", "0"])
    print_table(["case", "workers", "images", *TIME_HEADERS, "images/s", "input MB/s", "output MB"], rows)
    print()
    print("notes: m3i fully decodes every image to validate it, re-encodes every non-JPEG input (here the PNGs of")
    print("       labelled and eval) to JPEG, writes WebDataset tars with a sha256 each, per-unit progress records and")
    print("       index.json, and fsyncs each object; tar only copies bytes. The re-run reads each existing shard")
    print("       back to check its sha256, then skips it. MB/s counts input bytes for every line. CPU s: this process")
    print("       plus its finished child processes (tar, shard workers).")
    print()
    # Wall-time ratios answer "how much faster"; CPU-time ratios change less when other
    # processes share the cores, so both are printed.
    for name, w, t, _, _ in results:
        print_ratio(f"shard_m3i_workers{w}/tar images_per_s", tar_t.median / t.median)
    print_ratio("shard_m3i_rerun/tar images_per_s", tar_t.median / rerun_t.median)
    for name, w, t, _, _ in results:
        print_ratio(f"shard_m3i_workers{w}/tar images_per_cpu_s", tar_t.cpu_median / t.cpu_median)
    print_footer()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
