"""P3: cost of one M3I training step over one supervised-only step; P6: `m3i train` over a plain loop.

    python bench/step_cost.py --backbone vit_small_patch16_224 --image-size 112 --batch 32
    DS_ACCELERATOR=cpu python bench/step_cost.py --mode p6            # demo preset, 5 rounds

P3 (``--mode p3``, the default): an M3I step is forward (all three branches on a batch
mixing the sources), backward, AdamW step and EMA update; a supervised step is a plain
timm classifier (same backbone, same batch, every sample labelled) doing forward,
backward and AdamW step. Both run in one process on the same synthetic batch,
interleaved after a warm-up, and the medians are compared. Target: ratio <= 1.5.

P6 (``--mode p6``): the training loop's own cost. ``m3i train`` (one process, a
``--preset`` on the demo data set, everything the product loop does: DeepSpeed engine,
the finite-loss check, EMA, metrics, history, progress) against a plain PyTorch loop in
this process with the same model, the same batches (the same ``ShardLoader`` over the
same shards, same seed) and the same optimizer (torch AdamW with m3i's parameter groups,
learning-rate schedule and gradient clipping) plus the same EMA update. A step's time is
the wall time between the ends of two consecutive optimizer steps (data waits included,
on both sides); ``m3i train``'s come from the ``time`` column of its ``history.jsonl``.
The first ``--warmup`` steps of each run are left out; a round is one run of each side,
back to back. The last line is ``P6 ratio <x>``: the median over rounds of (m3i median
step / plain median step). Target: <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import timm
import torch
from torch.nn import functional as F

from m3i.config import Config, load_config
from m3i.models import backbone_kwargs, build_model
from m3i.text import build_tokenizer
from m3i.transforms import block_mask, num_masked


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("p3", "p6"), default="p3", help="P3 (M3I vs supervised step) or P6 (m3i train vs a plain loop)")
    p.add_argument("--preset", default="demo", help="P6: packaged preset of both sides (default demo)")
    p.add_argument("--repeats", type=int, default=5, help="P6: rounds of (m3i train, plain loop) (default 5)")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="timm ViT name or m3i_vit_* variant")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--labelled", type=float, default=1 / 3, help="fraction of the M3I batch with a label")
    p.add_argument("--captioned", type=float, default=1 / 3, help="fraction of the M3I batch with a caption")
    p.add_argument("--caption-bytes", type=int, default=96, help="UTF-8 bytes per synthetic caption")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; P6: 5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of each kind (default 10; P6: 20 per run)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 keeps the default; P6: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for both steps")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override, e.g. model.proj_dim=256"
    )
    return p.parse_args()


def make_batch(cfg: Config, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    n, size, patch = args.batch, cfg.data.image_size, cfg.model.patch_size
    g = torch.Generator().manual_seed(0)
    grid = (size // patch, size // patch)
    count = num_masked(grid[0] * grid[1], cfg.objective.mask_ratio)
    n_cls, n_txt = round(n * args.labelled), round(n * args.captioned)
    cls = torch.full((n,), -1)
    cls[:n_cls] = torch.randint(0, args.classes, (n_cls,), generator=g)
    has_txt = torch.zeros(n, dtype=torch.bool)
    has_txt[n_cls : n_cls + n_txt] = True  # disjoint from the labelled ones, as in the shards
    tok = build_tokenizer(cfg.model)
    words = "a photo of the red small large circle square in on top left corner centre with "
    text = (words * (args.caption_bytes // len(words) + 1))[: args.caption_bytes]
    tokens = tok.encode_batch([text if h else "" for h in has_txt.tolist()])
    geom = torch.stack([torch.tensor([0.1, -0.05, 0.9, 1.1, float(i % 2)]) for i in range(n)])
    batch = {
        "v1": torch.randn(n, 3, size, size, generator=g),
        "v2": torch.randn(n, 3, size, size, generator=g),
        "geom": geom,
        "mask": torch.stack([block_mask(g, grid, count, cfg.objective.mask_min_block) for _ in range(n)]),
        "cls": cls,
        "tokens": tokens,
        "has_txt": has_txt,
    }
    return {k: v.to(device) for k, v in batch.items()}


def timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step; CPU time is steadier on a shared host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    args = parse_args()
    if args.mode == "p6":
        main_p6(args)
        return
    args.warmup = 3 if args.warmup is None else args.warmup
    args.steps = 10 if args.steps is None else args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(
        None,
        overrides=[
            f"model.backbone={args.backbone}",
            f"data.image_size={args.image_size}",
            f"model.patch_size={args.patch_size}",
            *args.overrides,
        ],
    )
    batch = make_batch(cfg, args, device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp)

    torch.manual_seed(0)
    m3i = build_model(cfg, num_classes=args.classes).to(device).train()
    m3i_opt = torch.optim.AdamW([p for p in m3i.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    name, kwargs = backbone_kwargs(cfg)
    kwargs["num_classes"] = args.classes
    sup = timm.create_model(name, **kwargs).to(device).train()
    sup_opt = torch.optim.AdamW(sup.parameters(), lr=1e-4, foreach=True)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def m3i_step() -> None:
        with amp:
            loss = m3i(batch)["loss"]
        m3i_opt.zero_grad(set_to_none=True)
        loss.backward()
        m3i_opt.step()
        m3i.update_ema(0.995)

    def sup_step() -> None:
        with amp:
            loss = F.cross_entropy(sup(batch["v1"]), labels)
        sup_opt.zero_grad(set_to_none=True)
        loss.backward()
        sup_opt.step()

    for _ in range(args.warmup):
        sup_step()
        m3i_step()
    t_sup, t_m3i = [], []
    for _ in range(args.steps):  # interleaved, so drift in machine load hits both alike
        t_sup.append(timed(sup_step, device))
        t_m3i.append(timed(m3i_step, device))
    sup_s, m3i_s = (statistics.median(t[0] for t in ts) for ts in (t_sup, t_m3i))
    o = cfg.objective
    n_params = sum(p.numel() for p in m3i.parameters() if p.requires_grad)
    print(
        f"backbone={name} image={cfg.data.image_size} patch={cfg.model.patch_size} batch={args.batch} "
        f"device={device} threads={torch.get_num_threads()} amp={args.amp} steps={args.steps}"
    )
    print(
        f"m3i: mix_images={o.mix_images} mask_ratio={o.mask_ratio} branches="
        f"{'+'.join(b for b in ('img', 'cls', 'txt') if getattr(o, 'use_' + b))} "
        f"labelled={args.labelled:.2f} captioned={args.captioned:.2f} caption_bytes={args.caption_bytes} "
        f"trainable_params={n_params / 1e6:.1f}M (supervised {sum(p.numel() for p in sup.parameters()) / 1e6:.1f}M)"
    )
    for label, ts in (("supervised", t_sup), ("m3i", t_m3i)):
        wall = [t[0] * 1e3 for t in ts]
        print(f"{label:>10} step wall median {statistics.median(wall):8.1f} ms  min {min(wall):8.1f} ms", end="")
        if device.type == "cpu":
            print(f"  | cpu-time median {statistics.median(t[1] for t in ts) * 1e3:8.1f} ms", end="")
        print()
    if device.type == "cpu":
        cpu_ratio = statistics.median(t[1] for t in t_m3i) / statistics.median(t[1] for t in t_sup)
        print(f"P3 ratio (cpu-time medians): {cpu_ratio:.2f}x")
    print(f"P3 ratio m3i/supervised (wall medians): {m3i_s / sup_s:.2f}x (target <= 1.5x)")


def _m3i_train_steps(cfg_args: list[str], out: Path, env: dict[str, str], warmup: int) -> tuple[list[float], dict[str, float]]:
    """Step times of one ``m3i train`` run after ``warmup`` steps, plus its own medians of step and data-wait seconds."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "m3i", "-q", "train", *cfg_args, "--set", f"train.output={out}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    times = [row["time"] for row in rows]
    steps = [times[i] - times[i - 1] for i in range(max(1, warmup), len(times))]
    own = {k: statistics.median(row[k] for row in rows[warmup:]) for k in ("step_seconds", "data_wait_seconds")}
    return steps, own


def _plain_steps(cfg: Config, warmup: int) -> list[float]:
    """Step times of a plain PyTorch loop: same model, loader, optimizer, schedule, clipping and EMA as ``m3i train``."""
    import random

    import numpy as np

    from m3i.data import ShardLoader, to_device
    from m3i.models import ema_momentum
    from m3i.train.engine import lr_lambda, param_groups, peak_lr
    from m3i.transforms import build_transform

    t = cfg.train
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    loader = ShardLoader(cfg.data, build_transform(cfg, train=True))
    model = build_model(cfg, num_classes=cfg.model.num_classes or loader.num_classes).train()
    peak = peak_lr(cfg, 1)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=peak, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, peak))
    ends: list[float] = []
    step = 0
    try:
        while step < t.steps:
            for batch in loader:
                loss = model(to_device(batch, "cpu"))["loss"]  # uint8 views normalised as m3i train does
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                step += 1
                model.update_ema(ema_momentum(step, t.steps, cfg.model.ema_m0))
                float(loss.detach())  # m3i train reads its loss parts every step
                ends.append(time.time())
                if step >= t.steps:
                    break
    finally:
        loader.close()
    return [ends[i] - ends[i - 1] for i in range(max(1, warmup), len(ends))]


def main_p6(args: argparse.Namespace) -> None:
    """P6: ``m3i train`` step time over a plain PyTorch loop's, one process each, alternating rounds."""
    import os

    from _common import demo_counts, print_footer, print_header, print_table, workdir

    from m3i.config import ShardConfig
    from m3i.demo import make_demo_data
    from m3i.shard import shard

    warmup = 5 if args.warmup is None else args.warmup
    steps = 20 if args.steps is None else args.steps
    threads = args.threads or 1
    torch.set_num_threads(threads)
    print_header("P6 training-loop cost: m3i train vs a plain PyTorch loop (same model, batches, optimizer)")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("DS_ACCELERATOR", "cpu")
    with workdir(None, "m3i-bench-p6-") as work:
        counts = demo_counts(1)
        paths = make_demo_data(work / "raw", counts, seed=0)
        shards = str(work / "shards")
        shard(
            ShardConfig(out=shards, labelled=(paths["labelled"],), captions=(paths["captions"],),
                        unlabelled=(paths["unlabelled"],), eval_labelled=(paths["eval"],), max_samples_per_shard=256),
            progress=False,
        )
        overrides = [
            f"data.shards={shards}", f"train.steps={warmup + steps}", "checkpoint.interval_steps=1000000",
            "metrics.port=0", *args.overrides,
        ]
        cfg = load_config(args.preset, overrides=overrides)
        cfg_args = ["--preset", args.preset, *[x for o in overrides for x in ("--set", o)]]
        print(
            f"config:   --preset {args.preset} {' '.join('--set ' + o for o in overrides[1:])}; "
            f"model {cfg.model.backbone} at {cfg.data.image_size}px, batch {cfg.data.batch_size}, "
            f"{cfg.data.num_workers} loader worker(s), zero {cfg.train.zero_stage}, {cfg.train.precision}; "
            f"torch threads {threads} on both sides"
        )
        print(f"measured: {args.repeats} rounds of (m3i train, plain loop), {steps} timed steps each after {warmup}")
        print()
        m3i_runs, plain_runs, own = [], [], []
        for i in range(args.repeats):
            m3i_steps, own_medians = _m3i_train_steps(cfg_args, work / f"run-{i}", env, warmup)
            m3i_runs.append(statistics.median(m3i_steps))
            own.append(own_medians)
            plain_runs.append(statistics.median(_plain_steps(cfg, warmup)))
    rows = [
        ["m3i train", f"{statistics.median(m3i_runs) * 1e3:.1f}", " ".join(f"{x * 1e3:.1f}" for x in m3i_runs)],
        ["plain PyTorch loop", f"{statistics.median(plain_runs) * 1e3:.1f}", " ".join(f"{x * 1e3:.1f}" for x in plain_runs)],
    ]
    print_table(["side", "step ms, median of runs", "each run's median step ms"], rows)
    print()
    # A round's two runs follow each other, so their ratio sees the least change in machine
    # load; the median over rounds is the figure, the ratio of the medians a cross-check.
    paired = [m / p for m, p in zip(m3i_runs, plain_runs)]
    print(f"per-round ratios m3i/plain: {' '.join(f'{r:.3f}' for r in paired)}; "
          f"ratio of the medians: {statistics.median(m3i_runs) / statistics.median(plain_runs):.3f}")
    print(
        "m3i train's own history, median per step: compute "
        f"{statistics.median(o['step_seconds'] for o in own) * 1e3:.1f} ms, data wait "
        f"{statistics.median(o['data_wait_seconds'] for o in own) * 1e3:.1f} ms"
    )
    print_footer()
    print(f"P6 ratio {statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
