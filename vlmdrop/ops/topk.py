"""The one top-k of the package: which k of n scored tokens to keep."""

from __future__ import annotations

import torch


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) scores -> (k,) ascending indices of the k highest; ties go to the lower index.

    Args:
        scores: (n,) any float dtype (compared in float32).
        k: 0 <= k <= n; ValueError naming k and n otherwise.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep k={k} of {n} tokens")
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # (n,)
    return order[:k].sort().values  # (k,)
