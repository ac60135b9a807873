"""GPU benchmark: M3I training throughput and model FLOPs utilisation (MFU) on one device.

Trains ViT-B/16 M3I (all three branches) with bf16 and ZeRO-2 through the same DeepSpeed
engine, EMA update and loss as ``m3i train``, for a fixed number of steps, and prints
samples/s and MFU. Batches are made once by the real two-view transform from drawn demo
scenes and reused, so the figure is the model step, not the input pipeline.

MFU = (model FLOPs of one optimizer step, counted by torch's FlopCounterMode on a
forward + backward) x steps/s / the device's peak dense FLOPs (``--peak-tflops``; default
989 for an H100/H200 SXM in bf16).

    python bench/gpu_train_bench.py                        # ViT-B/16, 224 px, batch 128, 30 steps
    python bench/gpu_train_bench.py --device cpu --preset demo --batch 16 --steps 5   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128, help="micro-batch per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from m3i.config import load_config
    from m3i.data import to_device
    from m3i.demo import draw_scene
    from m3i.models import build_model, ema_momentum
    from m3i.train.dist import init_distributed
    from m3i.train.ema import EMAUpdater
    from m3i.train.engine import build_engine
    from m3i.transforms import build_transform
    from torch.utils.data import default_collate
    from torch.utils.flop_counter import FlopCounterMode

    overrides = [f"data.image_size={args.image_size}", f"data.batch_size={args.batch}", f"train.zero_stage={args.zero}",
                 f"train.precision={args.precision}", f"train.steps={args.warmup + 1 + args.steps}", *args.overrides]
    if args.preset != "demo":
        overrides.insert(0, f"model.backbone={args.backbone}")
    cfg = load_config(args.preset, None, overrides)
    info = init_distributed("gloo" if args.device == "cpu" else "auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)

    transform = build_transform(cfg, train=True)
    rng = random.Random(0)
    samples = []
    for i in range(args.batch):
        img, label, caption = draw_scene(rng, size=args.image_size)
        kind = i % 3  # a third each: labelled, captioned, unlabelled
        sample = {"image": img, "cls": label if kind == 0 else -1, "txt": caption if kind == 1 else "",
                  "source": ("labelled", "captioned", "unlabelled")[kind], "key": f"k{i}"}
        samples.append(transform(sample, torch.Generator().manual_seed(i)))
    batch = default_collate(samples)
    batch = to_device(batch, info.device, dtype)  # uint8 views normalised on the device, as m3i train does

    model = build_model(cfg, num_classes=8)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, _, _ = build_engine(cfg, model, info.world_size)
    ema = EMAUpdater(engine.module, zero3=cfg.train.zero_stage == 3, fp32_master=dtype is not None)
    autocast = lambda: torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731

    def step(i: int) -> None:
        with autocast():
            loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        ema.step(ema_momentum(i, cfg.train.steps, cfg.model.ema_m0))

    def sync() -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    with FlopCounterMode(display=False) as counter:  # counts matmul-like ops only: the optimizer adds ~0
        step(args.warmup)
    flops = counter.get_total_flops()
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + 1 + i)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    sps = args.batch / med
    achieved = flops / med
    mfu = achieved / (args.peak_tflops * 1e12)
    dev = torch.cuda.get_device_name() if info.device.type == "cuda" else platform.processor() or "cpu"
    print(f"command:  {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date:     {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device:   {dev}; torch {torch.__version__}")
    print(f"model:    {cfg.model.backbone} at {cfg.data.image_size}px, {n_params / 1e6:.1f}M trainable params, "
          f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, batch {args.batch}")
    print(f"step:     median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) over {args.steps} steps")
    if info.device.type == "cuda":
        print(f"memory:   max allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"flops:    {flops / 1e12:.2f} TFLOP per step (forward + backward, FlopCounterMode)")
    print(f"RESULT samples_per_second: {sps:.1f}")
    print(f"RESULT achieved_tflops: {achieved / 1e12:.1f}")
    print(f"RESULT mfu: {mfu:.3f} (peak {args.peak_tflops:g} TFLOPS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
