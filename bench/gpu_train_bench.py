"""P8: M3I training on one GPU: images/s, MFU and peak memory, the default preset against a plain ViT-B/16 step.

Two cases, each through the DeepSpeed engine ``m3i train`` builds (``build_engine``: AdamW,
schedule, the preset's ZeRO stage, precision and communication settings), on one batch made
once by the real two-view transform from demo scenes and reused, so the figure is the model
step, not the input pipeline:

- ``plain_vit``: a plain supervised step of the same timm backbone (``--preset default``:
  ViT-B/16 at 224 px) with a 1000-class linear head and cross-entropy on ``v1``.
- ``m3i_default``: the M3I step of ``--preset default`` (ViT-B/16, all three branches, image
  mixing, 4-block predictor, 12-layer open_clip text tower, EMA target) as the loop runs it:
  forward, the one host sync of the step (finite check + logged parts), backward, step, EMA.

FLOPs: :class:`m3i.models.flops.StepFlopCounter` (torch's ``FlopCounterMode``: every matmul,
convolution and attention kernel of one optimizer step, forward and backward, 2 FLOPs per
multiply-add; element-wise work and the optimizer not counted). Peak: the dense tensor-core
figure of ``m3i.models.flops.PEAK_FLOPS`` (NVIDIA data sheets) for the device's name and the
run's precision, or ``--peak-tflops``. MFU = FLOPs per step / median step seconds / peak.
Peak memory: ``torch.cuda.max_memory_allocated`` of each case, reset in between.

Last line ``P8 ratio <x>``: MFU of ``m3i_default`` / MFU of ``plain_vit`` (the ratio of achieved
FLOP/s, so it needs no peak): 1.0 means M3I's extra work (target encoder, predictor, text
tower, losses, EMA) keeps the GPU as busy as a plain ViT-B training step does.

    python bench/gpu_train_bench.py                  # on a GPU: batch 64 (the preset's), 20 steps after 5
    python bench/gpu_train_bench.py --tiny           # CPU smoke run of the same code (tests/test_gpu_bench.py)
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from _common import print_footer, print_header

# --tiny: the demo's micro ViT at 32 px with narrow heads: seconds on a CPU.
TINY = [
    "data.image_size=32", "model.backbone=m3i_vit_micro", "model.patch_size=8", "model.proj_dim=32",
    "model.predictor_depth=1", "model.predictor_heads=4", "model.embed_dim=32", "model.text_width=32",
    "model.text_depth=1", "model.text_heads=4", "model.text_max_len=16",
]


class Supervised(nn.Module):
    """The backbone with a linear classifier: ``batch -> {"loss": cross-entropy}`` on ``v1``."""

    def __init__(self, backbone: nn.Module, classes: int = 1000) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["v1"].to(self.head.weight.dtype)
        logits = self.head(self.backbone(x))  # [N, classes]
        return {"loss": F.cross_entropy(logits.float(), batch["label"])}


def make_batch(cfg, n: int, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``n`` demo scenes through the training transform, collated and moved as ``m3i train`` moves them."""
    from torch.utils.data import default_collate

    from m3i.data import to_device
    from m3i.demo import draw_scene
    from m3i.transforms import build_transform

    transform = build_transform(cfg, train=True)
    rng = random.Random(0)
    samples = []
    for i in range(n):
        img, label, caption = draw_scene(rng, size=cfg.data.image_size)
        kind = i % 3  # a third each: labelled, captioned, unlabelled
        sample = {"image": img, "cls": label if kind == 0 else -1, "txt": caption if kind == 1 else "",
                  "source": ("labelled", "captioned", "unlabelled")[kind], "key": f"k{i}"}
        samples.append(transform(sample, torch.Generator().manual_seed(i)))
    batch = to_device(default_collate(samples), device, dtype)
    batch["label"] = torch.arange(n, device=device) % 1000
    return batch


def run_case(name: str, cfg, model: nn.Module, batch, info, args) -> dict[str, float]:
    """Warm up, count one step's FLOPs, time ``args.steps`` steps; the case's figures."""
    from m3i.models import ema_momentum
    from m3i.models.flops import StepFlopCounter
    from m3i.train.ema import EMAUpdater
    from m3i.train.engine import build_engine
    from m3i.train.trainer import sync_micro_batch

    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, _, _ = build_engine(cfg, model, info.world_size)
    ema = EMAUpdater(engine.module, zero3=cfg.train.zero_stage == 3, fp32_master=cfg.train.precision != "fp32")
    total = args.warmup + 1 + args.steps

    def step(i: int) -> None:
        parts = engine(batch)
        finite, _, _ = sync_micro_batch(parts["loss"], parts, False)  # the trainer's one host sync
        if not finite:
            raise RuntimeError(f"{name}: non-finite loss at step {i}")
        engine.backward(parts["loss"])
        engine.step()
        ema.step(ema_momentum(i + 1, total, cfg.model.ema_m0))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    with StepFlopCounter() as counter:
        step(args.warmup)
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + 1 + i)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {
        "params": params, "flops": counter.total, "median": med, "min": min(times), "max": max(times),
        "images_per_second": args.batch / med, "achieved": counter.total / med,
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else float("nan"),
    }
    del engine, ema
    gc.collect()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="micro-batch of both cases (default: the preset's data.batch_size; 8 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --tiny)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the run's precision (default: m3i.models.flops.PEAK_FLOPS)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the demo's micro ViT at 32 px, ZeRO and precision as the preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both cases (section.key=value)")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)

    from m3i.config import load_config
    from m3i.models import build_model, create_backbone
    from m3i.models.flops import PEAK_FLOPS, peak_flops
    from m3i.train.dist import init_distributed
    from m3i.train.engine import configure_float32_matmuls

    args.batch = args.batch or (8 if args.tiny else None)
    overrides = [*(TINY if args.tiny else []), *([f"data.batch_size={args.batch}"] if args.batch else []), *args.overrides]
    cfg = load_config("default", None, overrides)
    args.batch = cfg.data.batch_size
    info = init_distributed(cfg.train.backend, device="cpu" if args.tiny else "cuda")
    configure_float32_matmuls(cfg, info.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    t = cfg.train

    print_header("P8: M3I training on one device, --preset default vs a plain ViT-B/16 step")
    device = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(device, t.precision, t.allow_tf32) if info.device.type == "cuda" else None)
    print(f"device:   {device}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"config:   {cfg.model.backbone} at {cfg.data.image_size} px, batch {args.batch}, {t.precision}, ZeRO-{t.zero_stage}, "
          f"overlap_comm {t.overlap_comm}, reduce/allgather buckets {t.reduce_bucket_size:.0e}/{t.allgather_bucket_size:.0e}, TF32 {t.allow_tf32}")
    print(f"steps:    {args.warmup} warm-up + 1 counted + {args.steps} timed per case")
    print("flops:    torch FlopCounterMode over one optimizer step (matmul, conv, attention; forward + backward; 2 per multiply-add)")
    known = ", ".join(re.sub(r"\\b", "", p) + f" {v[0] / 1e12:g}" for p, v in PEAK_FLOPS)
    source = "--peak-tflops" if args.peak_tflops else "m3i.models.flops.PEAK_FLOPS, dense, NVIDIA data sheets"
    print(f"peak:     {peak / 1e12:g} TFLOP/s ({source}); bf16 table: {known}" if peak else f"peak:     unknown for {device!r}: MFU not computed (bf16 table: {known})")
    sys.stdout.flush()

    batch = make_batch(cfg, args.batch, info.device, dtype)
    torch.manual_seed(0)
    results = {"plain_vit": run_case("plain_vit", cfg, Supervised(create_backbone(cfg)), batch, info, args)}
    torch.manual_seed(0)
    results["m3i_default"] = run_case("m3i_default", cfg, build_model(cfg, num_classes=8), batch, info, args)

    print("| case | trainable params | step, median (min-max) | images/s | TFLOP/step | achieved TFLOP/s | MFU | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        mfu = f"{r['achieved'] / peak:.3f}" if peak else "n/a"
        mem = f"{r['peak_memory'] / 2**30:.1f} GiB" if r["peak_memory"] == r["peak_memory"] else "n/a (CPU)"
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['median'] * 1e3:.1f} ms ({r['min'] * 1e3:.1f}-{r['max'] * 1e3:.1f}) | "
              f"{r['images_per_second']:.1f} | {r['flops'] / 1e12:.4f} | {r['achieved'] / 1e12:.3f} | {mfu} | {mem} |")
    print(f"RATIO images_per_second m3i_default/plain_vit: {results['m3i_default']['images_per_second'] / results['plain_vit']['images_per_second']:.3f}")
    print_footer()
    print(f"P8 ratio {results['m3i_default']['achieved'] / results['plain_vit']['achieved']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
