"""An optional short full fine-tune: the encoder plus a linear head, trained end to end on the labelled train split."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from m3i.artifacts.dataset import ShardIndex
from m3i.config import DataConfig, EvaluateConfig
from m3i.data import IMAGENET_MEAN, IMAGENET_STD, ShardLoader, resolve_device, to_device
from m3i.evaluate.features import Features, extract_features, labelled_count
from m3i.models.pretrained import embed

__all__ = ["finetune"]


class _Flip:
    """The eval view with a random horizontal flip drawn from the loader's per-sample generator (on uint8 pixels)."""

    def __init__(self, base: Callable) -> None:
        self.base = base

    def __call__(self, sample: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = self.base(sample, gen)
        if float(torch.rand((), generator=gen)) < 0.5:
            out["image"] = out["image"].flip(-1)
        return out


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(embed(self.encoder, images))  # [N, C]


def finetune(
    module: nn.Module,
    index: ShardIndex,
    cfg: EvaluateConfig,
    transform: Callable,
    image_size: int,
) -> Features:
    """Fine-tune a copy of ``module`` with a zero-initialised linear head; return eval-split logits.

    ``cfg.finetune_steps`` AdamW steps (``finetune_lr`` with 10 % linear warm-up and cosine decay,
    ``finetune_weight_decay`` on weight matrices) over shuffled labelled samples of
    ``cfg.train_split`` (batch ``cfg.batch_size``, eval view plus random flips), then scores every
    labelled sample of ``cfg.eval_split``. Runs on ``cfg.device``; batches are normalised there with
    ``transform.mean`` and ``transform.std`` (an :class:`m3i.evaluate.EvalView`'s; ImageNet's otherwise).

    Returns:
        :class:`Features` whose ``features`` are the eval-split logits ``[M, C]``, on the CPU.

    Raises:
        ValueError: When the train split has too few labelled samples for one batch.
    """
    device = resolve_device(cfg.device)
    mean, std = getattr(transform, "mean", IMAGENET_MEAN), getattr(transform, "std", IMAGENET_STD)
    torch.manual_seed(cfg.seed)
    encoder = copy.deepcopy(module).train()
    num_classes = index.num_classes
    model = _Classifier(encoder, module.num_features, num_classes).to(device)
    n = labelled_count(index, cfg.train_split)
    data = DataConfig(
        shards=index.uri, split=cfg.train_split, image_size=image_size, batch_size=min(cfg.batch_size, max(1, n)),
        num_workers=cfg.num_workers, seed=cfg.seed, shuffle_buffer=256, sources=("labelled",),
    )
    loader = ShardLoader(data, _Flip(transform), device=device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.finetune_weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.finetune_lr)
    total, warm = cfg.finetune_steps, max(1, cfg.finetune_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    step = 0
    while step < total:
        for batch in loader:
            batch = to_device(batch, device, None, mean, std)
            loss = F.cross_entropy(model(batch["image"]), batch["cls"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= total:
                break
    loader.close()  # its persistent workers (if any) are done
    model.eval()
    return extract_features(
        model, index, cfg.eval_split, transform, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        forward=lambda m, x: m(x), device=device,
    )
