"""P3: cost of one M3I training step over one supervised-only step, same backbone and batch.

    python bench/step_cost.py --backbone vit_small_patch16_224 --image-size 112 --batch 32

An M3I step is forward (all three branches on a batch mixing the sources), backward,
AdamW step and EMA update; a supervised step is a plain timm classifier (same backbone,
same batch, every sample labelled) doing forward, backward and AdamW step. Both run in one
process on the same synthetic batch, interleaved after a warm-up, and the medians are
compared. Target: ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import time
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
    p.add_argument("--backbone", default="vit_base_patch16_224", help="timm ViT name or m3i_vit_* variant")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--labelled", type=float, default=1 / 3, help="fraction of the M3I batch with a label")
    p.add_argument("--captioned", type=float, default=1 / 3, help="fraction of the M3I batch with a caption")
    p.add_argument("--caption-bytes", type=int, default=96, help="UTF-8 bytes per synthetic caption")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 keeps the default)")
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


if __name__ == "__main__":
    main()
