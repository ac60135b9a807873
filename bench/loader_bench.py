"""P2: images/s of ``m3i.data.ShardLoader`` against a plain PIL loop, and over S3 against a local folder.

    python bench/loader_bench.py                 # standard demo counts, 3 repeats
    python bench/loader_bench.py --image-size 224 --source-size 256 --no-s3
    python bench/loader_bench.py --scale 2 --num-workers 0 2 4

Both sides decode every image of the train split and apply the same
``m3i.data.ImageTransform(image_size)`` (uint8 crops), and both normalise every batch in this
process with ``m3i.data.to_device(batch, "cpu")``, as training does on its device: a case
ends with float32 batches in the main process. A timed run is one epoch. The plain loop opens
the source files (PNG and JPEG) with PIL in this process. The loader reads the shards
that ``m3i.shard.shard`` wrote, once from a local folder and once from
``s3://bucket/prefix`` on a moto S3 server on 127.0.0.1 that the benchmark starts.
Every case gets one untimed warm-up epoch (which also starts the loader's persistent
workers), then ``--repeats`` rounds in which each case runs one epoch in turn; the
median per case is reported. The last line, ``P2 ratio <x>``, is loader (0 workers,
local) / plain loop in wall-clock images/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from _common import (
    TIME_HEADERS,
    LoopbackS3,
    input_files,
    make_inputs,
    print_footer,
    print_header,
    workdir,
    print_ratio,
    print_table,
    time_interleaved,
)

import torch
from PIL import Image
from torch.utils.data import default_collate

from m3i.config import DataConfig, ShardConfig
from m3i.data import ImageTransform, ShardLoader, to_device
from m3i.demo import CLASSES
from m3i.shard import shard

TRAIN_KINDS = ("labelled", "captioned", "unlabelled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1, help="multiply every demo image count by N (default 1: standard counts)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per case after one warm-up; median reported (default 3)")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values (default: 0 2)")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size: side of the transformed crop (default 64)")
    p.add_argument(
        "--source-size", type=int, default=None, help="side of the generated demo images in px (default: the demo's 32)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="data.batch_size (default 64)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads of this process, where the plain loop and num_workers=0 run (default 1, "
        "what every DataLoader worker uses; 0 keeps torch's default)",
    )
    p.add_argument(
        "--s3-server",
        choices=("process", "thread"),
        default="process",
        help="run the moto server in its own process (default) or in a thread of the benchmark, where it shares the GIL",
    )
    p.add_argument("--no-s3", action="store_true", help="skip the S3 comparison")
    p.add_argument("--no-ceiling", action="store_true", help="skip the parallel-processes ceiling case")
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and shards here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    if any(n < 0 for n in args.num_workers):
        p.error(f"--num-workers={args.num_workers}: each must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_header("P2 loader throughput: m3i ShardLoader vs a plain PIL loop; s3:// vs a local folder")
    with workdir(args.workdir, "m3i-bench-loader-") as work:
        s3 = None
        try:
            if not args.no_s3:
                s3 = LoopbackS3(args.s3_server).start()
            run(args, work, s3)
        finally:
            if s3 is not None:
                s3.stop()


def plain_epoch(files: list[tuple[Path, int]], transform: ImageTransform, batch_size: int) -> int:
    """Decode and transform every file in this process, collated in batches like the loader's."""
    n = 0
    batch = []
    for path, cls in files:
        with Image.open(path) as img:
            image = img.convert("RGB")
        batch.append(transform({"image": image, "cls": cls}))
        if len(batch) == batch_size:
            n += _normalised(default_collate(batch))
            batch = []
    if batch:
        n += _normalised(default_collate(batch))
    return n


def _normalised(batch: dict) -> int:
    """Normalise a uint8 batch in this process as training does on its device; its image count."""
    return to_device(batch, "cpu")["image"].shape[0]


def _ceiling_child(cfg: DataConfig, transform: ImageTransform, threads: int, conn) -> None:
    """Body of a ceiling process: one 0-worker loader, an epoch per request from the parent."""
    torch.set_num_threads(max(1, threads))
    loader = ShardLoader(cfg, transform)
    sum(_normalised(batch) for batch in loader)  # warm-up, as every other case gets
    conn.send((0, 0.0))
    while conn.recv():
        c0 = time.process_time()
        n = sum(_normalised(batch) for batch in loader)
        conn.send((n, time.process_time() - c0))


class ParallelEpochs:
    """``k`` independent 0-worker loaders in ``k`` forked processes, one epoch each per call.

    No batch crosses a process boundary, so ``k`` images-per-epoch over the wall time of a
    call is what ``k`` cores of this machine give for ``k`` processes of this work: the
    ceiling for a ``k``-worker loader. Two CPU-bound processes at once need not run at twice
    the speed of one, for example where the virtual cores share a physical one.
    """

    def __init__(self, k: int, cfg: DataConfig, transform: ImageTransform, threads: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for _ in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_ceiling_child, args=(cfg, transform, threads, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            conn.recv()
        self.cpu: list[float] = []
        """CPU seconds of every call, summed over the processes."""

    def epoch(self) -> int:
        for conn in self.conns:
            conn.send(True)
        done = [conn.recv() for conn in self.conns]
        self.cpu.append(sum(c for _, c in done))
        return sum(n for n, _ in done)

    def close(self) -> None:
        for conn in self.conns:
            conn.send(False)
        for proc in self.procs:
            proc.join(30)


def run(args: argparse.Namespace, work: Path, s3: LoopbackS3 | None) -> None:
    if args.threads:
        # With torch's default (one thread per core) the per-image tensor ops of this process
        # spin OpenMP threads against the workers and other processes: at 224 px on a busy
        # 2-core machine an epoch's CPU time grew tenfold. Workers always run with one.
        torch.set_num_threads(args.threads)
    paths = make_inputs(work / "raw", args.scale, args.source_size)
    root = Path(paths["root"])

    def shard_cfg(out: str) -> ShardConfig:
        return ShardConfig(
            out=out,
            labelled=(paths["labelled"],),
            captions=(paths["captions"],),
            unlabelled=(paths["unlabelled"],),
            eval_labelled=(paths["eval"],),
        )

    uris = {"local": str(work / "shards")}
    shard(shard_cfg(uris["local"]), progress=False)
    if s3 is not None:
        bucket = s3.make_bucket(f"m3i-bench-{uuid.uuid4().hex[:10]}")
        uris["s3"] = f"{bucket}/demo/shards"
        shard(shard_cfg(uris["s3"]), progress=False)
        print(f"s3:       moto server at {s3.endpoint} ({args.s3_server}); shards at {uris['s3']}")

    classes = sorted(CLASSES)
    files = [(p, classes.index(p.parent.name) if p.parts[-3] == "labelled" else -1) for p in input_files(root, TRAIN_KINDS)]
    transform = ImageTransform(args.image_size)
    print(
        f"measured: the train split, {len(files)} images; image_size={args.image_size}, batch_size={args.batch_size}; "
        f"one warm-up epoch per case, then {args.repeats} rounds of one epoch per case, interleaved; "
        f"torch threads={torch.get_num_threads()}"
    )
    print()

    counted: dict[tuple[str, int], int] = {}
    runs: dict[tuple[str, int], Callable[[int], object]] = {}

    def plain(i: int) -> None:
        counted[("plain", 0)] = plain_epoch(files, transform, args.batch_size)

    runs[("plain", 0)] = plain
    loaders: dict[tuple[str, int], ShardLoader] = {}
    for nw in args.num_workers:
        for backend, uri in uris.items():
            cfg = DataConfig(shards=uri, image_size=args.image_size, batch_size=args.batch_size, num_workers=nw)
            loaders[(backend, nw)] = ShardLoader(cfg, transform)

            def epoch(i: int, key: tuple[str, int] = (backend, nw)) -> None:
                counted[key] = sum(_normalised(batch) for batch in loaders[key])

            runs[(backend, nw)] = epoch
    ceiling = None
    k = max(args.num_workers)
    if k > 1 and not args.no_ceiling:
        cfg = DataConfig(shards=uris["local"], image_size=args.image_size, batch_size=args.batch_size, num_workers=0)
        ceiling = ParallelEpochs(k, cfg, transform, args.threads)

        def parallel(i: int) -> None:
            counted[("ceiling", k)] = ceiling.epoch()

        runs[("ceiling", k)] = parallel
    try:
        timings = time_interleaved(runs, args.repeats, warmup=1)
    finally:
        for loader in loaders.values():
            loader.close()
        if ceiling is not None:
            ceiling.close()

    ips = {key: counted[key] / t.median for key, t in timings.items()}
    per_cpu = {key: counted[key] / t.cpu_median for key, t in timings.items() if t.cpu_median > 0}
    plain_t = timings[("plain", 0)]
    rows: list[list[object]] = [
        ["plain PIL loop over source files", "-", "local", counted[("plain", 0)], *plain_t.cells(), f"{ips[('plain', 0)]:,.0f}", "-"]
    ]
    for key, loader in loaders.items():
        stats = loader.stats()
        rows.append(["m3i ShardLoader", key[1], key[0], counted[key], *timings[key].cells(), f"{ips[key]:,.0f}",
                     "/".join(str(stats[n]) for n in ("shards_failed", "samples_failed", "samples_padded"))])
    if ceiling is not None:
        t = timings[("ceiling", k)]
        cpu = statistics.median(ceiling.cpu[-args.repeats :])
        rows.append([f"ceiling: {k} 0-worker loaders in {k} processes", "-", "local", counted[("ceiling", k)],
                     f"{t.median:.3f} ({t.spread()})", f"{cpu:.2f}", f"{ips[('ceiling', k)]:,.0f}", "-"])
    print_table(["case", "num_workers", "reads from", "images/epoch", *TIME_HEADERS, "images/s",
                 "failed shards/samples/padded"], rows)
    print()
    print("notes: the loader decodes the shards' JPEGs (labelled PNGs were re-encoded to JPEG by shard); the plain loop")
    print("       decodes the original PNG and JPEG files. The loader's workers are persistent: the warm-up epoch starts")
    print("       them, timed epochs reuse them. The plain loop is one process whatever num_workers says.")
    print("       The loader drops the remainder that does not fill a batch on every worker. CPU s: this process plus")
    print("       its DataLoader workers; the S3 server's CPU is not counted, but the server runs on the same cores.")
    print("       moto answers every request with 'Connection: close', so each shard GET opens a new loopback TCP")
    print("       connection. The ceiling row runs independent copies of the 0-worker epoch in as many processes as the")
    print("       most workers measured, at once, with no batch crossing processes: what this machine gives for that")
    print("       many processes of this work (CPU s: the sum of what those processes report).")
    print()
    # Wall-time ratios answer "how much faster"; CPU-time ratios (work per image, so no
    # gain from workers) change less when other processes share the cores.
    for unit, figs in (("images_per_s", ips), ("images_per_cpu_s", per_cpu)):
        for nw in args.num_workers:
            print_ratio(f"loader_local_workers{nw}/plain {unit}", figs[("local", nw)] / figs[("plain", 0)])
        if s3 is not None:
            for nw in args.num_workers:
                print_ratio(f"loader_s3/local_workers{nw} {unit}", figs[("s3", nw)] / figs[("local", nw)])
    for nw in args.num_workers:
        if nw > 0 and 0 in args.num_workers:
            print_ratio(f"loader_local_workers{nw}/workers0 images_per_s", ips[("local", nw)] / ips[("local", 0)])
    if ceiling is not None and 0 in args.num_workers:
        print_ratio(f"ceiling_{k}_processes/workers0 images_per_s", ips[("ceiling", k)] / ips[("local", 0)])
    print_footer()
    if 0 in args.num_workers:
        print(f"P2 ratio {ips[('local', 0)] / ips[('plain', 0)]:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
