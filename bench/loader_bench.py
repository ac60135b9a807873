"""P2: images/s of ``m3i.data.ShardLoader`` against a plain PIL loop, and over S3 against a local folder.

    python bench/loader_bench.py                 # standard demo counts, 3 repeats
    python bench/loader_bench.py --scale 2 --num-workers 0 2 4

Both sides decode every image of the train split and apply the same
``m3i.data.ImageTransform(image_size)``; a timed run is one epoch. The plain loop opens
the source files (PNG and JPEG) with PIL in this process. The loader reads the shards
that ``m3i.shard.shard`` wrote, once from a local folder and once from
``s3://bucket/prefix`` on a moto S3 server on 127.0.0.1 that the benchmark starts.
Every case gets one untimed warm-up epoch, then the median of ``--repeats`` epochs.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from _common import (
    TIME_HEADERS,
    LoopbackS3,
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

import torch
from PIL import Image
from torch.utils.data import default_collate

from m3i.config import DataConfig, ShardConfig
from m3i.data import ImageTransform, ShardLoader
from m3i.demo import CLASSES
from m3i.shard import shard

TRAIN_KINDS = ("labelled", "captioned", "unlabelled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1, help="multiply every demo image count by N (default 1: standard counts)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per case after one warm-up; median reported (default 3)")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values (default: 0 2)")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size: side of the transformed crop (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="data.batch_size (default 64)")
    p.add_argument(
        "--s3-server",
        choices=("process", "thread"),
        default="process",
        help="run the moto server in its own process (default) or in a thread of the benchmark, where it shares the GIL",
    )
    p.add_argument("--no-s3", action="store_true", help="skip the S3 comparison")
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
            n += default_collate(batch)["image"].shape[0]
            batch = []
    if batch:
        n += default_collate(batch)["image"].shape[0]
    return n


def run(args: argparse.Namespace, work: Path, s3: LoopbackS3 | None) -> None:
    paths = make_inputs(work / "raw", args.scale)
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
        f"one warm-up epoch, then the median of {args.repeats} epochs; torch threads={torch.get_num_threads()}"
    )
    print()

    rows: list[list[object]] = []
    figures: dict[tuple[str, int], float] = {}
    cpu_figures: dict[tuple[str, int], float] = {}

    counted: list[int] = []
    plain_t = time_runs(lambda i: counted.append(plain_epoch(files, transform, args.batch_size)), args.repeats, warmup=1)
    plain_ips = counted[-1] / plain_t.median
    rows.append(["plain PIL loop over source files", "-", "local", counted[-1], *plain_t.cells(), f"{plain_ips:,.0f}", "-"])

    for nw in args.num_workers:
        for backend, uri in uris.items():
            cfg = DataConfig(shards=uri, image_size=args.image_size, batch_size=args.batch_size, num_workers=nw)
            loader = ShardLoader(cfg, transform)
            seen: list[int] = []

            def epoch(i: int, loader: ShardLoader = loader) -> None:
                seen.append(sum(batch["image"].shape[0] for batch in loader))

            t: Timing = time_runs(epoch, args.repeats, warmup=1)
            stats = loader.stats()
            ips = seen[-1] / t.median
            figures[(backend, nw)] = ips
            cpu_figures[(backend, nw)] = seen[-1] / t.cpu_median
            rows.append(["m3i ShardLoader", nw, backend, seen[-1], *t.cells(), f"{ips:,.0f}",
                         "/".join(str(stats[k]) for k in ("shards_failed", "samples_failed", "samples_padded"))])

    print_table(["case", "num_workers", "reads from", "images/epoch", *TIME_HEADERS, "images/s",
                 "failed shards/samples/padded"], rows)
    print()
    print("notes: the loader decodes the shards' JPEGs (labelled PNGs were re-encoded to JPEG by shard); the plain loop")
    print("       decodes the original PNG and JPEG files. An epoch of the loader includes starting its DataLoader")
    print("       workers (persistent_workers=False). The plain loop is one process whatever num_workers says.")
    print("       The loader drops the remainder that does not fill a batch on every worker. CPU s: this process plus")
    print("       its DataLoader workers (ended within the epoch); the S3 server's CPU is not counted, but the server")
    print("       runs on the same cores. moto answers every request with 'Connection: close', so each shard GET")
    print("       opens a new loopback TCP connection.")
    print()
    # Wall-time ratios answer "how much faster"; CPU-time ratios (work per image, so no
    # gain from workers) change less when other processes share the cores.
    plain_cpu = counted[-1] / plain_t.cpu_median
    for unit, figs, plain in (("images_per_s", figures, plain_ips), ("images_per_cpu_s", cpu_figures, plain_cpu)):
        for nw in args.num_workers:
            print_ratio(f"loader_local_workers{nw}/plain {unit}", figs[("local", nw)] / plain)
        if s3 is not None:
            for nw in args.num_workers:
                print_ratio(f"loader_s3/local_workers{nw} {unit}", figs[("s3", nw)] / figs[("local", nw)])
    print_footer()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
