"""FLOPs of a training step as torch counts them, and the peak FLOP rate of a device: MFU.

    with StepFlopCounter() as counter:       # around one micro-batch's forward and backward
        parts = engine(batch); engine.backward(parts["loss"])
    flops = counter.total                      # model FLOPs of that micro-batch on this rank
    peak = peak_flops(torch.cuda.get_device_name(), "bf16")   # None for an unknown device
    mfu = flops / step_seconds / peak

Model FLOPs are counted, not derived from a formula: :class:`torch.utils.flop_counter.FlopCounterMode`
adds up every matmul, convolution and attention kernel torch dispatches (2 FLOPs per
multiply-add; backward kernels included), so the EMA target's forward, the predictor, the text
tower on the captioned samples and the heads all count, and element-wise work (norms, softmax
outside fused attention, the optimizer) does not, as in the usual MFU definition (PaLM, appendix B).
torch 2.14 counts CUDA's flash, memory-efficient and cuDNN attention kernels but not the CPU's
fused one, so CPU counts are low (and CPU MFU is not reported: no peak).
"""

from __future__ import annotations

import re

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_FLOPS", "StepFlopCounter", "peak_flops"]

# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s per GPU:
# (bf16/fp16, tf32, fp32 without tensor cores). SXM unless the name says otherwise.
# Checked first to last: more specific names before the names they contain.
PEAK_FLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    (r"H200 NVL", (835.5e12, 417.5e12, 60.0e12)),
    (r"H200", (989.4e12, 494.7e12, 66.9e12)),
    (r"H100 NVL", (835.5e12, 417.5e12, 60.0e12)),
    (r"H100 PCIe", (756.5e12, 378.0e12, 51.2e12)),
    (r"H100", (989.4e12, 494.7e12, 66.9e12)),
    (r"A100", (312.0e12, 156.0e12, 19.5e12)),
    (r"L40S", (362.1e12, 183.0e12, 91.6e12)),
    (r"\bL4\b", (121.0e12, 60.0e12, 30.3e12)),
)
"""``(device-name pattern, (bf16/fp16, tf32, fp32) peak FLOP/s))``, matched against ``torch.cuda.get_device_name()``."""


def peak_flops(device_name: str, precision: str, allow_tf32: bool = True) -> float | None:
    """The dense peak FLOP/s of a device for a run's precision, or ``None`` when the device is not in :data:`PEAK_FLOPS`.

    Args:
        device_name: ``torch.cuda.get_device_name()``, e.g. ``NVIDIA H100 80GB HBM3``.
        precision: ``train.precision``: ``bf16`` and ``fp16`` take the 16-bit tensor-core peak,
            ``fp32`` the TF32 one when ``allow_tf32`` else plain float32.
        allow_tf32: ``train.allow_tf32``.
    """
    for pattern, (half, tf32, fp32) in PEAK_FLOPS:
        if re.search(pattern, device_name):
            if precision in ("bf16", "fp16"):
                return half
            return tf32 if allow_tf32 else fp32
    return None


class StepFlopCounter:
    """Counts the FLOPs torch dispatches inside ``with``; one use, not re-entrant.

    Attributes:
        total: FLOPs counted (set on exit; 0 before).
    """

    def __init__(self) -> None:
        self._mode = FlopCounterMode(display=False)
        self.total = 0

    def __enter__(self) -> StepFlopCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self.total = int(self._mode.get_total_flops())
