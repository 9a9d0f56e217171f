"""Uniform spatial average pooling to the budget: the naive baseline.

Formula: `vlmdrop.ops.pool.pool_grid` (exact count, raster order).  Each crop's share of the budget
is proportional to its size (capped largest remainder, as for `random`); each crop's token grid --
for LLaVA-NeXT only the patches that survive unpadding, a rectangle of the crop's h×w grid; for
LLaVA-OneVision's down-sampled grids the anchor patches of the crop's packed rows, a sub-grid of it; for
InternVL each tile's post-shuffle grid -- is average-pooled to exactly its share.  Pooling happens on
the pre-projector features (the space of `ImageTokens.vit_hidden`); the pooled rows are then mapped
by the model's own projector.

Every pooled row is a new row, so `kept_indices` holds only original positions passed through
unchanged: whole crops whose share covers them (so `budget=1.0` is the identity) and LLaVA-NeXT
newline rows on overflow; it is empty in the usual case.  `new_groups[j]` lists the positions
pooled row j averages (its region).  Sequence order: kept positions in their original order, then
the pooled rows crop by crop (base image first), each crop's in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interface import ImageTokens, MethodConfig, Selection, VisionMethod
from ..ops.pool import pool_grid, token_grid
from ..registry import register_method
from .common import reduce_per_crop


@dataclass(frozen=True)
class PoolConfig(MethodConfig):
    """Parameters of pooling.

    budget: fraction (float in (0, 1]) or count (int >= 1) of each image's visual positions; each
        image hands exactly that many rows to the LLM.
    """

    budget_field = "budget"  # the parameter a budget sets (vlmdrop.eval.params.method_params)
    budget: float | int = 0.2

    needs = ("vit_hidden",)


@register_method("pool", PoolConfig)
class Pool(VisionMethod):
    """Average-pool each crop's token grid to its share of the budget (exact count)."""

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        if image.vit_hidden is None:
            raise ValueError("pool needs the feature-layer tokens; this adapter did not provide them")
        h, w = image.crop_hw

        def reduce(crop: int, positions: torch.Tensor, k: int):
            local = image.local_index[positions]  # (n,)
            order = local.argsort()
            positions, local = positions[order], local[order]  # raster order inside the crop
            ri, ci = token_grid(local, w=w)  # (R,), (C,) the grid rows and columns the crop's tokens fill
            dev = image.vit_hidden.device
            grid = image.vit_hidden[crop].reshape(h, w, -1)[ri.to(dev)][:, ci.to(dev)]  # (R, C, C')
            rows, cols = ri.numel(), ci.numel()
            pooled, g = pool_grid(grid.reshape(rows * cols, -1), h=rows, w=cols, target=k)  # (k, C')
            return positions[:0], pooled, [positions[gi] for gi in g]

        return reduce_per_crop(image, n_keep, reduce)
