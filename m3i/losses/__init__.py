"""The M3I objective's parts: UniGrad image loss, masked cross-entropy, gathered InfoNCE, the weighted sum."""

from m3i.losses.classification import masked_cross_entropy
from m3i.losses.contrastive import clip_loss
from m3i.losses.distributed import all_gather_nograd, all_gather_with_grad, all_reduce_sum, is_distributed, world_size
from m3i.losses.objective import BRANCHES, combine
from m3i.losses.unigrad import feature_std, target_covariance, unigrad_loss

__all__ = [
    "BRANCHES",
    "all_gather_nograd",
    "all_gather_with_grad",
    "all_reduce_sum",
    "clip_loss",
    "combine",
    "feature_std",
    "is_distributed",
    "masked_cross_entropy",
    "target_covariance",
    "unigrad_loss",
    "world_size",
]
