"""Shared budget accounting for vision-stage methods: crops first, layout rows only on overflow."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import kernels
from ..interface import ImageTokens, Selection
from ..ops.budget import largest_remainder


def shares_by_size(total: int, caps: list[int]) -> list[int]:
    """Whole shares of `total` proportional to each crop's size (capped largest remainder)."""
    return largest_remainder([float(c) for c in caps], total, caps)


def select_per_crop(image: ImageTokens, n_keep: int, budgets_for: Callable[[int, list[int]], list[int]],
                    pick: Callable[[int, torch.Tensor, int], torch.Tensor]) -> Selection:
    """Place `n_keep` tokens: whole shares per crop from `budgets_for(total, caps)`, then `pick`.

    Layout rows (LLaVA-NeXT newlines) carry no image content and are kept only when the budget
    exceeds every crop's capacity (budgets near 1.0); then the first ones in order are kept, so a
    budget of 1.0 is the identity.

    Args:
        budgets_for: (total, caps) -> shares per crop, in crop order, summing to total.
        pick: (crop, positions (n,), k) -> (k,) chosen positions, a subset of `positions`.
    """
    caps = image.crop_sizes()
    on_crops = min(n_keep, sum(caps))
    budgets = budgets_for(on_crops, caps)
    if sum(budgets) != on_crops or any(b > c for b, c in zip(budgets, caps)):
        raise AssertionError(f"crop budgets {budgets} must sum to {on_crops} within caps {caps}")
    chosen = []
    kept_counts = []
    for crop, k in enumerate(budgets):
        positions = image.crop_positions(crop)
        picked = pick(crop, positions, k) if k > 0 else positions[:0]
        kept_counts.append(int(picked.numel()))
        chosen.append(picked)
    chosen.append(image.layout_positions()[: n_keep - on_crops])
    kept = torch.cat(chosen).sort().values
    return Selection(kept_indices=kept, crop_budgets=budgets, crop_kept=kept_counts)


def select_top_per_crop(image: ImageTokens, n_keep: int, budgets_for: Callable[[int, list[int]], list[int]],
                        scores: torch.Tensor) -> Selection:
    """`select_per_crop` for methods that keep each crop's highest-scored tokens: one segmented top-k
    (`vlmdrop.kernels.segmented_topk`, one launch for every crop) instead of a top-k per crop.

    Args:
        budgets_for: (total, caps) -> shares per crop, in crop order, summing to total.
        scores: (n_before,) score of every position (layout rows' values are ignored); ties go to the
            lower position, as in `vlmdrop.ops.topk.top_k`.
    """
    if scores.shape != (image.n_before,):
        raise ValueError(f"scores must be ({image.n_before},), one per position, got {tuple(scores.shape)}")
    caps = image.crop_sizes()
    on_crops = min(n_keep, sum(caps))
    budgets = budgets_for(on_crops, caps)
    if sum(budgets) != on_crops or any(b > c for b, c in zip(budgets, caps)):
        raise AssertionError(f"crop budgets {budgets} must sum to {on_crops} within caps {caps}")
    crop_of = image.crop_of.to(scores.device)  # (n_before,)
    on_crop = (crop_of >= 0).nonzero(as_tuple=True)[0]  # (n_crop_positions,) ascending
    order = on_crop[torch.sort(crop_of[on_crop], stable=True).indices]  # positions grouped by crop, ascending within
    picked = kernels.segmented_topk(scores[order], torch.tensor(caps, device=scores.device),
                                    torch.tensor(budgets, device=scores.device))  # (on_crops,) into `order`
    layout = image.layout_positions().to(scores.device)[: n_keep - on_crops]
    kept = torch.cat([order[picked], layout]).sort().values  # (n_keep,)
    return Selection(kept_indices=kept, crop_budgets=budgets, crop_kept=list(budgets))


def resolve_layer(index: int, num_layers: int, *, what: str) -> int:
    """A ViT layer index (negative counts from the end) as a non-negative one, validated."""
    if not -num_layers <= index < num_layers:
        raise ValueError(f"{what}={index} is out of range for a vision tower with {num_layers} layers "
                         f"(valid: {-num_layers}..{num_layers - 1})")
    return index % num_layers


#: (crop, positions (n,) of a crop to reduce to k rows, k) -> (kept positions, new rows (m, C) or None,
#: m groups of positions the new rows summarise); kept + m == k.
Reducer = Callable[[int, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]]


def reduce_per_crop(image: ImageTokens, n_keep: int, reduce: Reducer) -> Selection:
    """Budget accounting for methods that make new rows (merging, pooling): shares by crop size,
    a crop whose share covers it kept as it is, the others reduced by `reduce`; layout rows only on
    overflow, as in `select_per_crop`.  New rows follow in crop order."""
    caps = image.crop_sizes()
    on_crops = min(n_keep, sum(caps))
    budgets = shares_by_size(on_crops, caps)
    kept, new_rows, groups = [], [], []
    for crop, k in enumerate(budgets):
        positions = image.crop_positions(crop)  # (n,) ascending
        if k == 0:
            continue
        if k >= positions.numel():  # the whole crop: kept as it is
            kept.append(positions)
            continue
        crop_kept, rows, crop_groups = reduce(crop, positions, k)
        kept.append(crop_kept)
        if rows is not None:
            new_rows.append(rows)
            groups.extend(crop_groups)
    kept.append(image.layout_positions()[: n_keep - on_crops])
    return Selection(kept_indices=torch.cat(kept).sort().values, crop_budgets=budgets, crop_kept=list(budgets),
                     new_rows=torch.cat(new_rows) if new_rows else None, new_groups=groups if new_rows else None)
