"""Config section of ``m3i evaluate``: frozen-feature kNN and linear probe, optional short fine-tune."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from m3i.config.core import MAX_BATCH, MAX_COUNT, MAX_LR, check_choice, check_positive, check_range

__all__ = ["DEVICES", "EvaluateConfig", "SPLITS"]

SPLITS = ("train", "eval")

DEVICES = ("auto", "cpu", "cuda")
"""Values of ``evaluate.device`` (resolved by :func:`m3i.data.resolve_device`)."""


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``m3i evaluate`` scores and where its results go. The data set is ``data.shards``."""

    model: str = ""
    """The model to score (folder or ``s3://`` prefix): an exported model (``config.json`` +
    ``model.safetensors``), one checkpoint (``.../checkpoints/step-00000500``) or a run's output
    (``train.output``: its latest complete checkpoint). Required by ``m3i evaluate``."""

    train_split: str = "train"
    """Split whose labelled samples (``cls >= 0``) are the kNN memory bank and the probe's training set."""

    eval_split: str = "eval"
    """Held-out split whose labelled samples are scored; must differ from ``train_split``."""

    k: int = 20
    """Neighbours that vote in the kNN classifier. [choice: InstDisc/DINO use 20]"""

    knn_temperature: float = 0.07
    """Votes are weighted by ``exp(cosine / T)``. [choice: InstDisc/DINO 0.07]"""

    random_init: bool = True
    """Also score the same architecture at random init (seeded as training seeds it, see
    ``metrics.json``'s ``random_init``) with the same eval view, kNN and probe: the baseline the
    trained scores are read against. Costs a second feature pass over both splits."""

    probe_epochs: int = 100
    """Epochs of the linear probe (logistic regression on standardised frozen features)."""

    probe_lr: float = 0.01
    """Peak AdamW learning rate of the linear probe (cosine decay to 0)."""

    probe_weight_decay: float = 1e-4
    """AdamW weight decay of the linear probe."""

    probe_batch_size: int = 256
    """Features per step of the linear probe."""

    finetune_steps: int = 0
    """Steps of an optional short full fine-tune (backbone + linear head) on ``train_split``; 0 is off."""

    finetune_lr: float = 1e-4
    """Peak AdamW learning rate of the fine-tune (linear warm-up over 10 % of the steps, cosine decay)."""

    finetune_weight_decay: float = 0.05
    """AdamW weight decay of the fine-tune."""

    out: str = "m3i-data/eval"
    """Where the results go (folder or ``s3://`` prefix): ``metrics.json`` (written last),
    ``kfp_metrics.json``, ``confusion_matrix.json``, ``confusion.png``, ``report.md`` and, when the
    model's training history is found, ``loss_curves.png``."""

    pushgateway: str = ""
    """URL of a Prometheus Pushgateway (``http://host:9091``) that receives the scores; empty is off.
    A failed push is a warning, never an error."""

    batch_size: int = 64
    """Images per forward pass when extracting features (and per fine-tune step)."""

    num_workers: int = 0
    """DataLoader worker processes that decode images; shards are split among them."""

    seed: int = 0
    """Seed of the probe's initialisation and order, and of the fine-tune."""

    device: str = "auto"
    """Where feature extraction, kNN, the linear probe and the fine-tune run: ``auto`` (the GPU when
    torch finds CUDA, else the CPU), ``cpu``, or ``cuda`` (an error, exit status 2, where CUDA is not
    available). Scores on the CPU are what they were before this setting existed; on a GPU they may
    differ in the last digits (float rounding of other kernels)."""

    def __post_init__(self) -> None:
        s = "evaluate"
        check_choice(s, "train_split", self.train_split, SPLITS)
        check_choice(s, "eval_split", self.eval_split, SPLITS)
        if self.train_split == self.eval_split:
            raise ValueError(
                f"evaluate.eval_split={self.eval_split!r} equals evaluate.train_split; "
                "scoring the memory bank on itself is not held-out; allowed: two different splits"
            )
        check_range(s, "k", self.k, 1, MAX_COUNT)
        check_positive(s, "knn_temperature", self.knn_temperature)
        check_range(s, "probe_epochs", self.probe_epochs, 1, MAX_COUNT)
        check_range(s, "probe_lr", self.probe_lr, 0.0, MAX_LR, lo_open=True)
        check_range(s, "probe_weight_decay", self.probe_weight_decay, 0.0, MAX_LR)
        check_range(s, "probe_batch_size", self.probe_batch_size, 1, MAX_BATCH)
        check_range(s, "finetune_steps", self.finetune_steps, 0, MAX_COUNT)
        check_range(s, "finetune_lr", self.finetune_lr, 0.0, MAX_LR, lo_open=True)
        check_range(s, "finetune_weight_decay", self.finetune_weight_decay, 0.0, MAX_LR)
        if not self.out:
            raise ValueError("evaluate.out='' is not allowed; give a folder or s3://bucket/prefix")
        if self.pushgateway:
            url = self.pushgateway if "://" in self.pushgateway else f"http://{self.pushgateway}"
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
                raise ValueError(
                    f"evaluate.pushgateway={self.pushgateway!r} is not a URL; allowed: '' (off) or http(s)://host[:port]"
                )
        check_range(s, "batch_size", self.batch_size, 1, MAX_BATCH)
        check_range(s, "num_workers", self.num_workers, 0, 64)
        check_range(s, "seed", self.seed, 0)
        check_choice(s, "device", self.device, DEVICES)
