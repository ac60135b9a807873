"""The baseline every score is compared with: the encoder's own architecture at random init.

    base = random_init(enc)       # same architecture, as training initialised it
"""

from __future__ import annotations

import torch
from torch import nn

from m3i.models.pretrained import Encoder

__all__ = ["random_init"]


def random_init(encoder: Encoder) -> nn.Module:
    """The encoder's architecture at random init, seeded as training seeds it, in eval mode on the CPU.

    Training calls ``torch.manual_seed(train.seed)`` and then builds the model, backbone first
    (:func:`m3i.train.train`, :class:`m3i.models.M3IModel`), so for a checkpoint this is the
    backbone the run started from (unless ``train.init_from`` loaded other weights over it). The
    caller's RNG state is left as it was.

    Raises:
        ValueError: When the encoder carries no ``build`` (one made by hand).
    """
    if encoder.build is None:
        raise ValueError(f"the encoder from {encoder.uri or 'memory'} cannot be rebuilt at random init: it has no build")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder.seed)
        module = encoder.build()
    return module.eval()
