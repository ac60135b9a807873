"""Block-wise masks over a patch grid with an exact masked count. [sim, after BEiT]"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

__all__ = ["block_mask", "num_masked"]


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches a mask of ``ratio`` covers: rounded, and at least one kept and one masked."""
    return min(max(int(round(ratio * num_patches)), 1), num_patches - 1)


def block_mask(
    gen: torch.Generator,
    grid: tuple[int, int],
    count: int,
    min_block: int = 16,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """A block-wise mask with exactly ``count`` masked patches.

    Rectangles of at least ``min_block`` patches (log-uniform aspect in
    ``[min_aspect, 1/min_aspect]``) are added until ``count`` is reached or no rectangle
    fits; the rest is filled with random single patches, as SiameseIM's
    ``fixed_num_masking_patches``. The exact count keeps every row of a batch the same
    length after gathering.

    Args:
        gen: The only source of randomness (a Python RNG is seeded from it for the loop).
        grid: Patch grid ``(rows, cols)``.
        count: Patches to mask, ``0 < count < rows * cols``.
        min_block: Fewest patches per rectangle (capped at ``count``).
        min_aspect: Smallest aspect ratio of a rectangle.

    Returns:
        ``BoolTensor[rows * cols]`` in row-major patch order, ``True`` where masked.
    """
    rows, cols = grid
    assert 0 < count < rows * cols, (count, grid)
    rng = random.Random(int(torch.randint(0, 2**62, (), generator=gen)))
    mask = np.zeros((rows, cols), dtype=bool)
    min_block = min(min_block, count)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    done = 0
    while done < count:
        budget = count - done
        added = 0
        for _ in range(10):
            target = rng.uniform(min_block, max(budget, min_block))
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h <= rows and 0 < w <= cols:
                top = rng.randint(0, rows - h)
                left = rng.randint(0, cols - w)
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region[...] = True
                    added = new
                    break
        if added == 0:
            break
        done += added
    if done < count:
        free = np.flatnonzero(~mask.ravel()).tolist()
        rng.shuffle(free)
        mask.ravel()[free[: count - done]] = True
    return torch.from_numpy(mask.ravel().copy())
