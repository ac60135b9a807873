"""P4: peak memory of `m3i export` against the size of the float32 backbone it writes.

    python bench/export_memory.py                          # ViT-B/16 M3I, both layouts, three exports each
    python bench/export_memory.py --layouts zero0 --cases online-fp32

A checkpoint of the full M3I model at the default preset (ViT-B/16 online encoder + EMA
target + projector, predictor, class head and a 12-block text encoder) is made first, in
its own process, in one of two layouts:

* ``zero0``: DeepSpeed's ZeRO-0 fp32 file, written by hand: ``mp_rank_00_model_states.pt``
  with the module state and AdamW moments for every trainable tensor (as a trained ZeRO-0
  checkpoint carries them), plus ``complete.json``.
* ``ds-zero3-bf16``: a real save of a 1-process DeepSpeed ZeRO-3 bf16 engine through
  ``m3i.train.Checkpointer`` (0 steps): the float32 master copies live in the optimizer
  shard and the EMA's in the client state, so the online and EMA exports read other files.

Each export then runs in a fresh child process. After its imports and config parsing the
child notes its resident set and resets the kernel's high-water mark (``/proc/self/clear_refs``,
Linux); at the end, ``VmHWM`` is the peak of the export itself. ``RATIO`` lines give ``(peak
during export - resident before it) / fp32 backbone bytes`` (target: at most 1.5). The table also
shows each child's whole-life peak (``ru_maxrss`` from ``wait4``) and a baseline child that only
imports the same modules and parses the same config; their difference understates the export's
cost, because interpreter start-up and shutdown have transient peaks of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_footer, print_header, print_ratio, print_table  # noqa: E402

CASES = {"online-fp32": ("online", "fp32"), "online-bf16": ("online", "bf16"), "ema-fp32": ("ema", "fp32")}
LAYOUTS = ("zero0", "ds-zero3-bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", help="m3i preset of the model (default: %(default)s, ViT-B/16)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. model.backbone=m3i_vit_small")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--workdir", help="keep the checkpoints and exports here (default: a temp folder, removed)")
    p.add_argument("--child", choices=("make", "baseline", "export"), help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(args: argparse.Namespace, *extra: str):
    from m3i.config import load_config

    return load_config(args.preset, None, [*args.overrides, *extra])


# ------------------------------------------------------------------------------------------ children


def _make_zero0(args: argparse.Namespace) -> None:
    """The ZeRO-0 fp32 layout, by hand: module state + AdamW moments, and the completion marker."""
    import torch

    from m3i.config import to_dict
    from m3i.models import build_model

    cfg = _config(args, f"train.output={args.run}", "train.zero_stage=0", "train.precision=fp32")
    model = build_model(cfg, num_classes=1000)
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
               for i, p in enumerate(q for q in model.parameters() if q.requires_grad)}
    meta = {"m3i_version": "bench", "run_id": "bench-zero0", "config": to_dict(cfg), "num_classes": 1000,
            "data_index_sha256": None, "inputs_sha256": None}
    tag = Path(args.run) / "checkpoints" / "step-00000001"
    (tag / "ds").mkdir(parents=True)
    state = {"module": model.state_dict(), "buffer_names": ["ema_m"], "optimizer": {"state": moments, "param_groups": []},
             "param_shapes": None, "frozen_param_shapes": None, "frozen_param_fragments": None, "step": 1,
             "ema": {"master": None}, "meta": meta}
    torch.save(state, tag / "ds" / "mp_rank_00_model_states.pt")
    files = [{"key": "ds/mp_rank_00_model_states.pt", "bytes": (tag / "ds" / "mp_rank_00_model_states.pt").stat().st_size}]
    (tag / "complete.json").write_text(json.dumps({"step": 1, "world_size": 1, "files": files, **meta}))


def _make_ds_zero3_bf16(args: argparse.Namespace) -> None:
    """A real 1-process DeepSpeed ZeRO-3 bf16 engine, saved by m3i's checkpointer at step 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from m3i import __version__
    from m3i.config import to_dict
    from m3i.models import build_model
    from m3i.train.checkpoint import Checkpointer
    from m3i.train.dist import init_distributed
    from m3i.train.ema import EMAUpdater
    from m3i.train.engine import build_engine

    cfg = _config(args, f"train.output={args.run}", "train.zero_stage=3", "train.precision=bf16", "checkpoint.staging_dir=" + str(Path(args.run).parent / "staging"))
    info = init_distributed("gloo")
    model = build_model(cfg, num_classes=1000)
    engine, _, _ = build_engine(cfg, model, 1)
    ema = EMAUpdater(engine.module, zero3=True, fp32_master=True)
    meta = {"m3i_version": __version__, "run_id": "bench-ds-zero3-bf16", "config": to_dict(cfg), "num_classes": 1000,
            "data_index_sha256": None, "inputs_sha256": None}
    Checkpointer(cfg.checkpoint, cfg.train.output, info, "bench").save(
        engine, 1, {"step": 1, "loader": {}, "ema": ema.state_dict(), "meta": meta}, {"loader": {}, "rng": {}}
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _baseline(args: argparse.Namespace) -> None:
    """Everything the export child imports and parses, without exporting."""
    import m3i.export  # noqa: F401
    from m3i.models import backbone_kwargs

    backbone_kwargs(_config(args))


def _export(args: argparse.Namespace) -> None:
    from m3i.export import export

    weights, dtype = CASES[args.case]
    cfg = _config(args, f"export.checkpoint={args.run}", f"export.out={args.out}", f"export.weights={weights}",
                  f"export.dtype={dtype}", f"export.name={args.layout}-{args.case}")
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    r = export(cfg)
    peak = _status_kib("VmHWM")
    print(json.dumps({"bytes": r.bytes, "uri": r.uri, "seconds": r.seconds, "rss_before": before * 1024, "peak": peak * 1024}))


# ------------------------------------------------------------------------------------------ parent


def _run_child(args: argparse.Namespace, role: str, **kw: str) -> tuple[int, str, float]:
    """Run this script as ``role`` in a fresh interpreter; returns (its peak RSS in bytes, stdout, seconds)."""
    cmd = [sys.executable, __file__, "--child", role, "--preset", args.preset, *[f"--set={o}" for o in args.overrides]]
    cmd += [f"--{k}={v}" for k, v in kw.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss in KiB on Linux
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"bench child {role} failed ({proc.returncode}):\n{err.read()[-4000:]}")
        return usage.ru_maxrss * 1024, out.read(), seconds


def _backbone_bytes(args: argparse.Namespace) -> tuple[str, int]:
    import timm
    import torch

    from m3i.models import backbone_kwargs

    name, kwargs = backbone_kwargs(_config(args))
    with torch.device("meta"):
        net = timm.create_model(name, **kwargs)
    return name, sum(math.prod(p.shape) * 4 for p in net.state_dict().values())


def main() -> int:
    args = parse_args()
    if args.child:
        {"make": lambda: (_make_zero0 if args.layout == "zero0" else _make_ds_zero3_bf16)(args),
         "baseline": lambda: _baseline(args), "export": lambda: _export(args)}[args.child]()
        return 0
    print_header("P4: export peak memory vs the float32 backbone")
    arch, fp32_bytes = _backbone_bytes(args)
    print(f"model:    preset {args.preset} {args.overrides or ''}: backbone timm {arch}, float32 backbone {fp32_bytes / 2**20:.1f} MiB")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="m3i-p4-"))
    root.mkdir(parents=True, exist_ok=True)
    rows, ratios = [], {}
    try:
        base, _, _ = _run_child(args, "baseline")
        rows.append(["baseline (imports + config)", "-", "-", f"{base / 2**20:.0f}", "-", "-", "-", "-"])
        for layout in args.layouts:
            run = root / layout
            shutil.rmtree(run, ignore_errors=True)
            make_rss, _, make_s = _run_child(args, "make", layout=layout, run=str(run))
            ckpt = sum(p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file())
            print(f"checkpoint {layout}: {ckpt / 2**20:.0f} MiB on disk, made in {make_s:.0f}s (peak RSS {make_rss / 2**30:.1f} GiB)")
            for case in args.cases:
                peak, out, _ = _run_child(args, "export", layout=layout, case=case, run=str(run), out=str(root / "models"))
                written = json.loads(out.strip().splitlines()[-1])
                rise = written["peak"] - written["rss_before"]
                ratios[f"{layout} {case}"] = rise / fp32_bytes
                rows.append([f"export {case}", layout, f"{ckpt / 2**20:.0f}", f"{peak / 2**20:.0f}",
                             f"{written['rss_before'] / 2**20:.0f} -> {written['peak'] / 2**20:.0f}", f"{rise / 2**20:.0f}",
                             f"{written['bytes'] / 2**20:.0f}", f"{written['seconds']:.1f}"])
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print_table(["child", "layout", "checkpoint MiB", "child peak RSS MiB", "RSS before -> peak of export MiB",
                 "export rise MiB", "weights file MiB", "export s"], rows)
    for name, ratio in ratios.items():
        print_ratio(f"export_peak_rss/fp32_backbone_bytes {name}", ratio)
    print(f"target:   at most 1.5 -> {'met' if all(r <= 1.5 for r in ratios.values()) else 'MISSED'} in every case")
    print_footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
