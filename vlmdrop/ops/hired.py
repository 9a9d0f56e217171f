"""HiRED (Arif et al., AAAI 2025): budget allocation across crops and selection inside a crop.

Paper, Alg. 1 / Eq. 1–2: a budget B is split α·B to the base (full) image and (1-α)·B over the
sub-images in proportion to s_i, the first ViT layer's CLS attention (summed over heads) summed over
the base-image patches inside sub-image i's region; inside each crop the tokens with the highest
feature-layer CLS attention (summed over heads) are kept.  Shares are made whole with capped
largest-remainder rounding so they sum to B exactly.
"""

from __future__ import annotations

import torch

from .budget import largest_remainder


def region_scores(base_attn: torch.Tensor, base_region: torch.Tensor, n_sub: int) -> torch.Tensor:
    """s_i: base-image attention summed inside each sub-image's region.

    Args:
        base_attn: (N_base,) first-layer CLS attention of the base image, summed over heads.
        base_region: (N_base,) sub-image index (0..n_sub-1) of each base patch.

    Returns:
        (n_sub,) float64.
    """
    if base_attn.shape != base_region.shape:
        raise ValueError(f"base_attn {tuple(base_attn.shape)} and base_region {tuple(base_region.shape)} differ")
    if n_sub < 1 or int(base_region.max()) >= n_sub or int(base_region.min()) < 0:
        raise ValueError(f"base_region values must lie in [0, {n_sub}), "
                         f"got [{int(base_region.min())}, {int(base_region.max())}]")
    s = torch.zeros(n_sub, dtype=torch.float64)
    return s.index_add_(0, base_region.cpu(), base_attn.detach().double().cpu())  # (n_sub,)


def crop_budgets(total: int, caps: list[int], *, alpha: float, sub_scores: torch.Tensor | None) -> list[int]:
    """HiRED Eq. 1–2 with exact integers: α of `total` to the base image, the rest by `sub_scores`.

    Args:
        total: tokens to place over the crops (at most sum(caps)).
        caps: positions available per crop, base first.
        alpha: base-image fraction, in [0, 1].
        sub_scores: (n_sub,) s_i, or None when there are no sub-images.

    Returns:
        Whole shares, base first, summing to min(total, sum(caps)), none above its cap.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    n_sub = len(caps) - 1
    if n_sub == 0:
        return [min(total, caps[0])]
    if sub_scores is None or sub_scores.numel() != n_sub:
        raise ValueError(f"need {n_sub} sub-image scores, got {None if sub_scores is None else sub_scores.numel()}")
    s = sub_scores.double().clamp_min(0)
    s = s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1.0 / n_sub)
    weights = [alpha] + [(1.0 - alpha) * v for v in s.tolist()]
    return largest_remainder(weights, total, caps)
