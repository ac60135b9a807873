"""P1: shard-writing throughput of ``m3i.shard.shard`` against decoding each input once with PIL.

    python bench/shard_bench.py                                # standard demo counts, 3 rounds
    python bench/shard_bench.py --scale 25 --workdir /tmp/p1   # runs of > 5 s; inputs kept and reused

The baseline is the validation floor: every input file read and fully decoded once with PIL
(``Image.open(BytesIO(bytes)).load()``), in 1 process and in N processes for the N-worker case.
``m3i shard`` has to do at least that to reject truncated and corrupt images, so its
images/s over the floor's says how much everything else costs. Two input sets:

- ``mix``: the demo data set as it is: PNG (labelled, eval), which m3i must re-encode to JPEG,
  work the floor leaves out, and JPEG (captioned, unlabelled), copied as they are after the
  decode. For the mix a second floor also JPEG-encodes the PNGs (decode + required re-encode).
- ``jpeg``: the JPEG sources alone; here decoding is the only image work m3i must do.

The last line, ``P1 ratio <x>``, is m3i with ``workers=1`` over the 1-process floor on the
JPEG-only set (on the mix when only ``--inputs mix`` is given), with the lock's fixed settle
wait (0.5 s per run, ``m3i.shard.lock.OutputLock``) taken out of m3i's time; the ratio with
it left in is printed above it. The inputs are read from the page cache by every case. Cases
run round-robin, one run of each per round (``--repeats`` rounds), each m3i case right after
the floor it is compared with, so that changes in the machine's load hit both alike; a ratio
is the median of its per-round ratios, a table figure the median run. Each m3i run writes into
a fresh output folder (the old one is removed outside the timing). GNU ``tar -cf`` (+ fsync)
over the same files, a re-run of ``shard`` over an existing output (the resume path: every
unit's shards read, hashed against their sha256 and skipped) and m3i's listing of the inputs
alone (``m3i.shard.plan.discover``, part of every m3i run) are extra lines; so is the cost of
the input checks on the read path: every input read with ``m3i.shard.files.read_regular``
(regular files only, the size capped before the read) next to a plain ``open(path).read()``.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from _common import (
    TIME_HEADERS,
    Timing,
    demo_counts,
    input_files,
    make_inputs,
    print_footer,
    print_header,
    print_ratio,
    print_table,
    time_runs,
    workdir,
)
from PIL import Image

import m3i
from m3i.config import ShardConfig
from m3i.demo import DemoCounts, make_demo_data
from m3i.shard import ShardIndex, shard
from m3i.shard.lock import OutputLock
from m3i.shard.plan import discover

MB = 1e6
# demo source -> (ShardConfig field, the demo path key); captions.jsonl names the captioned images.
SOURCES = {
    "labelled": ("labelled", "labelled"),
    "captioned": ("captions", "captions"),
    "unlabelled": ("unlabelled", "unlabelled"),
    "eval": ("eval_labelled", "eval"),
}
INPUT_SETS = {"mix": ("labelled", "captioned", "unlabelled", "eval"), "jpeg": ("captioned", "unlabelled")}
LOCK_SETTLE_S = inspect.signature(OutputLock).parameters["settle_seconds"].default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1, help="multiply every demo image count by N (default 1: standard counts)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each case runs once per round, the median is reported (default 3)")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 0],
        help="shard.workers values to measure; 0 = every core (default: 1 2 0; 0 is left out where it equals another)",
    )
    p.add_argument(
        "--inputs", nargs="+", choices=sorted(INPUT_SETS), default=["mix", "jpeg"],
        help="input sets: mix = the demo data (PNG and JPEG), jpeg = its JPEG sources alone (default: both)",
    )
    p.add_argument(
        "--size", type=int, default=None,
        help="side of the demo images in px (default: the demo's 32); per-image costs other than the decode weigh less on larger images",
    )
    p.add_argument("--no-tar", action="store_true", help="leave out the GNU tar line")
    p.add_argument(
        "--workdir", type=Path, default=None,
        help="keep inputs and outputs here instead of a temporary folder; inputs of the same --scale and --size found there are reused",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    if any(w < 0 for w in args.workers):
        p.error(f"--workers={args.workers}: each must be >= 0 (0 = every core)")
    if args.size is not None and not 16 <= args.size <= 512:
        p.error(f"--size={args.size} must be in [16, 512]")
    if 1 not in args.workers:
        p.error(f"--workers={args.workers} must include 1: the P1 ratio is the 1-worker figure")
    return args


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode(paths: list[str], quality: int | None) -> int:
    """The floor's work: read each file and fully decode it once; with ``quality``, JPEG-encode every non-JPEG."""
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            if quality is not None and img.format != "JPEG":
                img.convert("RGB").save(io.BytesIO(), format="JPEG", quality=quality)
    return len(paths)


def _read_plain(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            f.read()


def _read_checked(paths: list[str]) -> None:
    """Each input as m3i's encoder reads it: kind and size checked before the read (code from #22 on)."""
    from m3i.shard.files import read_regular

    cap = next(f.default for f in fields(ShardConfig) if f.name == "max_input_bytes")
    for path in paths:
        read_regular(path, cap)


def _decode_in(procs: int, paths: list[str], quality: int | None) -> None:
    """:func:`_decode` in ``procs`` fresh processes, each over an equal share of ``paths``."""
    if procs == 1:
        _decode(paths, quality)
        return
    # fork, as m3i's worker pool (the default start method on Linux); started inside the timing, as m3i's is.
    ctx = mp.get_context("fork")
    pool = ctx.Pool(procs)
    try:
        done = sum(pool.starmap(_decode, [(paths[i::procs], quality) for i in range(procs)]))
    finally:
        pool.close()
        pool.join()  # waited for: their CPU time counts
    assert done == len(paths)


def _counts(scale: int, size: int | None) -> DemoCounts:
    counts = demo_counts(scale)
    return counts if size is None else replace(counts, size=size)


def _inputs(root: Path, scale: int, size: int | None) -> dict[str, str]:
    """The demo data set under ``root``: reused if a finished earlier run wrote the same counts, else written."""
    found = _existing_inputs(root, scale, size)
    if found is not None:
        return found
    if size is None:
        return make_inputs(root, scale)
    t0 = time.perf_counter()
    counts = _counts(scale, size)
    paths = make_demo_data(root, counts, seed=0)
    print(f"inputs:   m3i.demo data x{scale}, {size}x{size} px: {counts} (written in {time.perf_counter() - t0:.1f}s)")
    return {**paths, "root": str(Path(root).resolve())}


def _existing_inputs(root: Path, scale: int, size: int | None) -> dict[str, str] | None:
    """The demo data under ``root`` if a finished earlier run wrote it with the same counts and seed."""
    try:
        manifest = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return None
    counts = _counts(scale, size)
    want = {f: getattr(counts, f) for f in ("labelled", "captioned", "unlabelled", "eval", "size")}
    if not (manifest.get("complete") and manifest.get("seed") == 0 and manifest.get("counts") == want):
        return None
    print(f"inputs:   m3i.demo data x{scale} reused from {root} ({want})")
    rel = manifest["paths"]
    return {**{k: str(root / rel[k]) for k in ("labelled", "captions", "unlabelled", "eval")}, "root": str(root)}


@dataclass
class Case:
    """One line of the table: a run function, and its timings over the rounds."""

    name: str
    workers: str
    run: Callable[[], object]
    images: int
    before: Callable[[], None] = lambda: None
    """Untimed, before each run (removing the previous output)."""
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def once(self) -> None:
        self.before()
        t = time_runs(lambda _i: self.run(), 1)
        self.seconds += t.seconds
        self.cpu += t.cpu

    @property
    def timing(self) -> Timing:
        return Timing(self.seconds, self.cpu)

    @property
    def rate(self) -> float:
        """Images per wall second (median run)."""
        return self.images / self.timing.median

    @property
    def cpu_rate(self) -> float:
        return self.images / self.timing.cpu_median


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_header("P1 shard-writing throughput: m3i.shard.shard vs decoding every input once with PIL")
    with workdir(args.workdir, "m3i-bench-shard-") as work:
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    # shard.workers=0 means os.cpu_count(); that is the number the floor gets for it.
    resolved = {w: (w or os.cpu_count() or 1) for w in args.workers}
    workers = [w for w in dict.fromkeys(args.workers) if w != 0 or list(resolved.values()).count(resolved[0]) == 1]
    print(f"m3i from: {Path(m3i.__file__).parent}")
    paths = _inputs(work / "raw", args.scale, args.size)
    root = Path(paths["root"])
    quality = next(f.default for f in fields(ShardConfig) if f.name == "jpeg_quality")
    if not args.no_tar:
        print(f"tar:      {subprocess.run(['tar', '--version'], capture_output=True, text=True, check=True).stdout.splitlines()[0]}")
    outs = work / "out"

    def label(w: int) -> str:
        n = resolved[w]
        return f"{w} (all {n} cores)" if w == 0 else f"{w} (all cores)" if n == cores and n > 1 else str(w)

    sets: dict[str, dict] = {}
    for name in args.inputs:
        kinds = INPUT_SETS[name]
        files = [str(p) for p in input_files(root, kinds)]
        members = [k for k in kinds if k != "captioned"] + (["captioned", Path(paths["captions"]).name] if "captioned" in kinds else [])
        in_bytes = sum(os.path.getsize(p) for p in files)
        n = len(files)
        pngs = sum(p.endswith(".png") for p in files)
        print(f"set {name}: {n} images ({n - pngs} JPEG, {pngs} PNG), {in_bytes / MB:.1f} MB")

        def cfg(out: Path, w: int, kinds=kinds) -> ShardConfig:
            fields = {SOURCES[k][0]: (paths[SOURCES[k][1]],) for k in kinds}
            return ShardConfig(out=str(out), workers=w, **fields)

        # Each m3i case runs right after the floor it is compared with, so that both see about the same load.
        cases: dict[str, Case] = {}
        last: dict[int, ShardIndex] = {}
        for procs in sorted({1, *(resolved[w] for w in workers)}):
            cases[f"floor{procs}"] = Case(
                f"decode floor: read + PIL decode, {procs} process{'es' if procs > 1 else ''}", str(procs),
                lambda procs=procs, files=files: _decode_in(procs, files, None), n,
            )
            for w in (w for w in workers if resolved[w] == procs):
                out = outs / f"{name}-w{w}"

                def m3i_run(w: int = w, out: Path = out, cfg=cfg, last=last) -> None:
                    last[w] = shard(cfg(out, w), progress=False)

                cases[f"m3i{w}"] = Case("m3i shard", label(w), m3i_run, n, before=lambda out=out: shutil.rmtree(out, ignore_errors=True))
        if pngs:
            cases["work1"] = Case(
                f"decode + JPEG-encode the {pngs} PNG (q={quality}), 1 process", "1",
                lambda files=files: _decode_in(1, files, quality), n,
            )
        c0 = cfg(work, 1)
        cases["discover"] = Case(
            "of m3i: listing the inputs (plan.discover)", "1",
            lambda c0=c0: discover(c0.labelled, c0.captions, c0.unlabelled, c0.eval_labelled), n,
        )
        cases["read_plain"] = Case("reading each input: open(path).read()", "1", lambda files=files: _read_plain(files), n)
        if any(f.name == "max_input_bytes" for f in fields(ShardConfig)):  # code with the checks (#22 on)
            cases["read_checked"] = Case(
                "of m3i: reading each input with its checks (files.read_regular)", "1", lambda files=files: _read_checked(files), n
            )
        rerun_out = outs / f"{name}-w1"
        reruns: list[dict] = []
        cases["rerun"] = Case(
            "m3i shard re-run (every unit reused)", "1",
            lambda cfg=cfg, out=rerun_out, reruns=reruns: reruns.append(shard(cfg(out, 1), progress=False).raw["run"]), n,
        )
        if not args.no_tar:

            def tar_run(members=members, dest=outs / f"{name}-tar" / "all.tar") -> None:
                subprocess.run(["tar", "-cf", str(dest), "-C", str(root), *members], check=True)
                _fsync(dest)  # m3i fsyncs each object it writes; so does this side

            def tar_before(dest=outs / f"{name}-tar") -> None:
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)

            cases["tar"] = Case("GNU tar -cf (+ fsync)", "1", tar_run, n, before=tar_before)
        sets[name] = {"cases": cases, "last": last, "reruns": reruns, "n": n, "bytes": in_bytes, "pngs": pngs}
    print(f"measured: {args.repeats} rounds, each case once per round (round-robin), median reported")
    print()

    for _ in range(args.repeats):
        for s in sets.values():
            for case in s["cases"].values():  # m3i1 comes before rerun, which re-runs over its output
                case.once()

    for name, s in sets.items():
        for w, index in s["last"].items():
            if index.raw["totals"]["samples"] != s["n"]:
                raise RuntimeError(f"{name} w{w}: the index holds {index.raw['totals']['samples']} samples, the inputs {s['n']}")
        if any(r["units_written"] for r in s["reruns"]):
            raise RuntimeError(f"{name}: a re-run wrote units; it should have reused all of them")
    report(args, sets, workers, resolved)


def report(args: argparse.Namespace, sets: dict[str, dict], workers: list[int], resolved: dict[int, int]) -> None:
    for name, s in sets.items():
        cases: dict[str, Case] = s["cases"]
        print(f"## input set: {name} ({s['n']} images, {s['pngs']} of them PNG, {s['bytes'] / MB:.1f} MB)")
        rows = []
        for c in cases.values():
            rows.append([c.name, c.workers, c.images, *c.timing.cells(), f"{c.rate:,.0f}", f"{c.cpu_rate:,.0f}"])
        print_table(["case", "procs/workers", "images", *TIME_HEADERS, "images/s", "images/CPU s"], rows)
        m1 = cases["m3i1"].timing
        print(
            f"fixed cost in every m3i run: the lock's settle wait {LOCK_SETTLE_S:.2f} s "
            f"({LOCK_SETTLE_S / m1.median:.1%} of the median 1-worker run)"
        )
        print()

    print("notes: the floor reads each file and fully decodes it with PIL (Image.open(BytesIO(bytes)).load()); it")
    print("       gets the file list for free (listing is m3i's 'discover' line) and writes nothing. m3i lists and")
    print("       checks the inputs, decodes each image once, copies JPEG bytes as they are, re-encodes every PNG to")
    print("       JPEG, writes deterministic WebDataset tars with a sha256 each, per-unit progress records and")
    print("       index.json, and fsyncs each object. CPU s: this process plus its finished child processes.")
    print()

    def ratio(name: str, a: Case, b: Case, minus: float = 0.0) -> list[float]:
        """a's images/s over b's, per round (a and b ran close together), ``minus`` seconds taken off a's runs.

        Prints the median over the rounds; returns the per-round values.
        """
        rounds = [tb / (ta - minus) for ta, tb in zip(a.seconds, b.seconds)]
        print_ratio(name, statistics.median(rounds))
        return rounds

    headline: dict[str, list[float]] = {}
    for name, s in sets.items():
        c = s["cases"]
        ratio(f"{name} m3i_workers1/decode_floor_1proc images_per_s (lock settle included)", c["m3i1"], c["floor1"])
        net = ratio(f"{name} m3i_workers1/decode_floor_1proc images_per_s (lock settle subtracted)", c["m3i1"], c["floor1"], LOCK_SETTLE_S)
        print_ratio(
            f"{name} m3i_workers1/decode_floor_1proc images_per_cpu_s",
            statistics.median(fb / fa for fa, fb in zip(c["m3i1"].cpu, c["floor1"].cpu)),
        )
        # Where the rest goes: listing the inputs is m3i's work but not the floor's (not paired: another part of the round).
        listing = statistics.median(c["discover"].seconds)
        ratio(f"{name} m3i_workers1/decode_floor_1proc images_per_s (lock settle and listing subtracted)",
              c["m3i1"], c["floor1"], LOCK_SETTLE_S + listing)
        if "read_checked" in c:
            ratio(f"{name} read_checked/read_plain images_per_s (the input checks on the read path)", c["read_checked"], c["read_plain"])
        if "work1" in c:
            ratio(f"{name} m3i_workers1/(decode+PNG_reencode)_1proc images_per_s (lock settle subtracted)", c["m3i1"], c["work1"], LOCK_SETTLE_S)
        for w in workers:
            if w != 1:
                all_cores = " all_cores" if resolved[w] == (os.cpu_count() or 1) else ""
                ratio(f"{name} m3i_workers{w}/decode_floor_{resolved[w]}proc{all_cores} images_per_s (lock settle subtracted)",
                      c[f"m3i{w}"], c[f"floor{resolved[w]}"], LOCK_SETTLE_S)
        two = next((w for w in workers if resolved[w] == 2), None)
        if two is not None:
            ratio(f"{name} scaling m3i_workers2/m3i_workers1 images_per_s", c[f"m3i{two}"], c["m3i1"])
            ratio(f"{name} scaling decode_floor_2proc/decode_floor_1proc images_per_s", c["floor2"], c["floor1"])
        if "tar" in c:
            ratio(f"{name} m3i_workers1/tar images_per_s", c["m3i1"], c["tar"])
        headline[name] = net
    name = "jpeg" if "jpeg" in headline else next(iter(headline))
    print_footer()
    rounds = " ".join(f"{r:.3f}" for r in headline[name])
    print(f"P1 headline: input set {name!r}, m3i shard workers=1 over the 1-process decode floor, lock settle subtracted; "
          f"median of the rounds {rounds}")
    print(f"P1 ratio {statistics.median(headline[name]):.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
