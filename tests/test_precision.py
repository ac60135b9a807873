"""Mixed precision the way DeepSpeed runs it on CUDA, reproduced on CPU.

DeepSpeed's bf16/fp16 engines cast the module's parameters (not its buffers) and run forward
with autocast off: on CUDA ``autocast_if_enabled`` even turns an outer autocast off. So the
model must be dtype-clean: no float32 tensor may meet a low-precision weight, while the loss
statistics stay float32. These tests build that situation on CPU, where DeepSpeed never takes
that branch by itself. ``M3I_TEST_DEVICE=cuda`` runs the same tests on a GPU's own kernels
(scripts/gpu-check.sh does).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from m3i.config import Config, load_config
from m3i.models import build_model
from tests.test_models import TINY_HEADS, make_batch

DEVICE = torch.device(os.environ.get("M3I_TEST_DEVICE", "cpu"))
LOW = [torch.bfloat16, torch.float16]
# Every subset of the three branches; the category branch alone needs classes (given below).
BRANCHES = [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)]


def _cfg(preset: str, branches: tuple[int, int, int], mix: bool, *extra: str) -> Config:
    img, cls, txt = (bool(b) for b in branches)
    small = ["data.image_size=32", "model.num_classes=4"]
    if preset == "demo":
        small += TINY_HEADS  # the demo's own backbone (m3i_vit_micro, patch 8), narrower heads
    else:
        # The default preset's structure (open_clip text tower, avg pooling, predictor, mixing)
        # at tiny widths; its ViT-B backbone is run once in test_the_default_vit_b_backbone_runs_in_bf16.
        small += [*TINY_HEADS, "model.backbone=m3i_vit_micro", "model.patch_size=8", "model.text_max_len=16"]
    return load_config(preset, overrides=[*small, f"objective.use_img={img}", f"objective.use_cls={cls}", f"objective.use_txt={txt}", f"objective.mix_images={mix}", *extra])


def as_deepspeed_casts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to ``dtype``, buffers kept: what DeepSpeed 0.19.8's engine does to a bf16/fp16 module
    (``DeepSpeedEngine._cast_module_mixed_precision`` with no ``buffer_dtype``)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def low_precision_batch(batch: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device = DEVICE) -> dict[str, torch.Tensor]:
    """Every floating tensor of the batch in ``dtype`` on ``device``, as the loop hands a bf16/fp16 run its batch."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


class DtypeGuard:
    """Records every call of a weight-holding layer whose floating inputs differ from its weights' dtype.

    Silent promotions (a float32 tensor added to a bf16 one gives float32) do not raise in
    PyTorch until a matmul; the guard finds them where they enter a layer. Layers are the leaf
    modules with weights (Linear, Conv2d, LayerNorm, Embedding) and attention modules; a
    composite such as the predictor takes float32 positions by design and casts them itself.
    """

    def __init__(self, model: nn.Module) -> None:
        self.mismatches: list[str] = []
        self.handles = []
        for name, mod in model.named_modules():
            own = [p for p in mod.parameters(recurse=False)]
            if own and (not any(True for _ in mod.children()) or isinstance(mod, nn.MultiheadAttention)):
                self.handles.append(mod.register_forward_pre_hook(self._hook(name or type(mod).__name__, own[0].dtype)))

    def _hook(self, name: str, dtype: torch.dtype):
        def check(module, args):
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype:
                    self.mismatches.append(f"{name}: {a.dtype} input, {dtype} weights")

        return check

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _forward_backward(cfg: Config, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = as_deepspeed_casts(build_model(cfg, num_classes=4).to(DEVICE), dtype)
    batch = low_precision_batch(make_batch(cfg, n=6), dtype, DEVICE)
    guard = DtypeGuard(model)
    assert not torch.is_autocast_enabled(DEVICE.type)
    try:
        out = model(batch)
        out["loss"].backward()
    finally:
        guard.close()
    return model, out, guard.mismatches


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mix", [False, True], ids=["masked", "mixed"])
@pytest.mark.parametrize("branches", BRANCHES, ids=lambda b: "+".join(n for n, on in zip(("img", "cls", "txt"), b) if on))
@pytest.mark.parametrize("preset", ["demo", "default"])
def test_every_branch_combination_runs_forward_and_backward_in_low_precision_without_autocast(preset, branches, mix, dtype):
    cfg = _cfg(preset, branches, mix)
    model, out, mismatches = _forward_backward(cfg, dtype)
    assert mismatches == []
    # Loss statistics (UniGrad's C, InfoNCE logits, CE) stay float32, and so does what is logged.
    assert {k: v.dtype for k, v in out.items()} == {k: torch.float32 for k in out}
    assert all(bool(torch.isfinite(v)) for v in out.values()), out
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no gradient reached the model"
    assert all(g.dtype == dtype and bool(torch.isfinite(g).all()) for _, g in grads), [n for n, g in grads if g.dtype != dtype]
    for name, on in zip(("img", "cls", "txt"), branches):
        assert out[f"loss_{name}"].requires_grad == bool(on), name


@pytest.mark.parametrize("mix", [False, True], ids=["masked", "mixed"])
def test_low_precision_losses_track_the_float32_ones(mix):
    """Same weights and batch in bf16 and in float32: the losses agree to bf16's precision, so the
    float32 positions and statistics are still float32 where it matters (a bf16 position grid or
    covariance moves them by more)."""
    cfg = _cfg("default", (1, 1, 1), mix)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in make_batch(cfg, n=6).items()}
    with torch.no_grad():
        ref = model(batch)
        low = as_deepspeed_casts(model, torch.bfloat16)(low_precision_batch(batch, torch.bfloat16))
    for k in ("loss", "loss_img", "loss_cls", "loss_txt"):
        assert float(low[k]) == pytest.approx(float(ref[k]), rel=0.05, abs=1e-3), k


def test_the_default_vit_b_backbone_runs_in_bf16():
    """The default preset's own ViT-B/16 (at 32 px) and mixing, all branches, bf16 weights."""
    cfg = load_config("default", overrides=["data.image_size=32", "model.num_classes=4", "model.text_width=64", "model.text_depth=1", "model.text_heads=4", "model.text_max_len=16", "model.predictor_depth=1"])
    assert cfg.model.backbone == "vit_base_patch16_224" and cfg.objective.mix_images
    model, out, mismatches = _forward_backward(cfg, torch.bfloat16)
    assert mismatches == [] and bool(torch.isfinite(out["loss"]))
    assert model.backbone.blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16
