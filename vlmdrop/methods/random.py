"""Random dropping: the baseline every paper needs, with HiRED's budget accounting."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interface import ImageTokens, MethodConfig, Selection, VisionMethod
from ..registry import register_method
from .common import select_per_crop, shares_by_size

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """Parameters of random dropping.

    budget: fraction (float in (0, 1]) or count (int >= 1) of each image's visual positions to keep.
    seed: seed of the generator, an int in [0, 2**64 - 1]; the same seed and inputs keep the same
        tokens.  The generator is re-seeded at every prefill and draws images in batch order.
    """

    budget_field = "budget"  # the parameter a budget sets (vlmdrop.eval.params.method_params)
    budget: float | int = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**64 - 1] (torch.Generator's seed range)")


@register_method("random", RandomConfig)
class Random(VisionMethod):
    """Uniformly random tokens; each crop's share is proportional to its size (largest remainder)."""

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(int(self.config.seed))
        return g

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        def pick(crop: int, positions: torch.Tensor, k: int) -> torch.Tensor:
            perm = torch.randperm(positions.numel(), generator=generator)  # (n,)
            return positions[perm[:k]].sort().values

        return select_per_crop(image, n_keep, shares_by_size, pick)
