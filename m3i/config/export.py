"""Config section of ``m3i export``: a training checkpoint -> a plain timm backbone in object storage."""

from __future__ import annotations

import re
from dataclasses import dataclass

from m3i.config.core import check_choice

__all__ = ["ExportConfig", "WEIGHTS", "DTYPES"]

WEIGHTS = ("online", "ema")
DTYPES = ("fp32", "bf16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ExportConfig:
    """Which checkpoint, which encoder, which precision, and where the exported model goes."""

    checkpoint: str = ""
    """A run's output (folder or ``s3://`` prefix, as ``train.output``: its latest complete checkpoint is
    taken) or one checkpoint (``.../checkpoints/step-00000500``). Empty uses ``train.output``."""

    out: str = "m3i-data/models"
    """Export root (folder or ``s3://`` prefix). A model goes under ``<out>/<name>/v<step:08d>-<sha8>/``,
    ``sha8`` being the first 8 hex digits of the weights file's sha256: another export never overwrites
    a version, and exporting the same weights again lands on the same prefix."""

    name: str = ""
    """Model name, the first level under ``out``: letters, digits, ``.``, ``_``, ``-`` (at most 128).
    Empty uses the run id recorded in the checkpoint."""

    weights: str = "online"
    """``online`` (the encoder the optimiser trained) or ``ema`` (the momentum target). Online by default:
    it is the encoder all three branches train (the category and text losses reach only it), the one
    ``M3IModel.encode`` and the heads use, and the one MAE-style fine-tuning and linear probing start
    from; the EMA target exists only with ``objective.use_img`` and, with the momentum going to 1 over
    training, ends as a lagging average of the online encoder. [choice: the spec leaves it open]"""

    dtype: str = "fp32"
    """Weights file precision: ``fp32`` or ``bf16``. A bf16/fp16 run exports fp32 from its fp32 master
    weights (the optimizer's copy, and the EMA's float32 master), not from the rounded module."""

    metrics: str = ""
    """URI of a JSON file of evaluation scores to put in the model card (for instance what ``m3i evaluate``
    wrote); empty writes "not yet evaluated"."""

    staging_dir: str = ""
    """Local folder for downloaded checkpoint files and the files being written; empty uses a temp
    folder. A checkpoint in a local folder is read in place, never copied."""

    def __post_init__(self) -> None:
        s = "export"
        if not self.out:
            raise ValueError("export.out='' is not allowed; give a folder or s3://bucket/prefix")
        if self.name and not _NAME.match(self.name):
            raise ValueError(
                f"export.name={self.name!r} is not allowed; use 1-128 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit (or leave it empty for the run id)"
            )
        check_choice(s, "weights", self.weights, WEIGHTS)
        check_choice(s, "dtype", self.dtype, DTYPES)
