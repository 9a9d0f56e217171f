"""Budget arithmetic: how many tokens a budget means, and exact integer shares.

Pure functions, no model knowledge.  Every method resolves its budget here so that a "20 %" budget
keeps exactly `round(0.2 * n)` tokens, split into whole-number shares that sum to it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def validate_budget(budget: object, *, name: str = "budget") -> float | int:
    """Return `budget` if it is a float in (0, 1] or an int >= 1, else raise ValueError naming it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(
            f"{name}={budget!r} ({type(budget).__name__}) is not valid: use a float fraction in (0, 1] "
            f"(e.g. 0.2 keeps 20 % of the visual tokens) or an int token count >= 1 (e.g. 64)"
        )
    if isinstance(budget, float) and not (0.0 < budget <= 1.0 and math.isfinite(budget)):
        raise ValueError(f"{name}={budget!r} is not valid: a float budget must lie in (0, 1]; an int >= 1 is a count")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"{name}={budget!r} is not valid: an int budget is a token count and must be >= 1")
    return budget


def resolve_budget(budget: float | int, n: int) -> int:
    """Number of tokens to keep out of `n`.

    A float keeps `round(budget * n)` (Python rounding, at least 1 when n > 0); an int keeps
    `min(budget, n)`.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if n == 0:
        return 0
    if isinstance(budget, float):
        return min(n, max(1, round(budget * n)))
    return min(int(budget), n)


def largest_remainder(weights: Sequence[float], total: int, caps: Sequence[int], *,
                      normalize_first: bool = False) -> list[int]:
    """Split `total` into whole shares proportional to `weights`, none above its cap.

    Capped proportional apportionment: shares whose ideal value exceeds their cap are fixed at the cap
    and the rest is re-split over the others (water-filling); the ideal values are then floored and
    the leftover units go to the largest fractional parts (ties: lower index first).  The result sums
    to exactly `min(total, sum(caps))`.  Zero-weight items get units only when every positive-weight
    item is full (then in proportion to their remaining capacity).

    Args:
        weights: non-negative, one per item.
        total: units to hand out, >= 0.
        caps: capacity of each item, >= 0.
        normalize_first: compute each ideal share as `remaining * (w_i / sum w)` (weights normalised
            first) instead of `remaining * w_i / sum w`.  The two are equal in exact arithmetic but round
            differently in floating point, which decides exact ties (e.g. weights [1.0, 0.2], total 3,
            caps [5, 2]: ideal 2.5 / 0.5 gives [2, 1] by default, [3, 0] normalised first).  GlobalCom2's
            exact mode (`ops.globalcom2.crop_keep_counts`) has always used the normalised order; it keeps
            it so its published numbers stay byte-identical.  Every other caller uses the default.
    """
    k = len(weights)
    if len(caps) != k:
        raise ValueError(f"weights has {k} items but caps has {len(caps)}")
    if total < 0:
        raise ValueError(f"total={total} must be >= 0")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if any(c < 0 for c in caps):
        raise ValueError(f"caps must be >= 0, got {list(caps)}")
    total = min(total, sum(caps))
    shares = [0] * k
    if total == 0:
        return shares

    ideal = [0.0] * k
    free = [i for i in range(k) if caps[i] > 0]
    remaining = float(total)
    # Water-filling: items whose proportional share exceeds their cap are saturated, then re-split.
    while free and remaining > 0:
        wsum = sum(weights[i] for i in free)
        if wsum > 0:
            share = {i: weights[i] for i in free}
            denom = wsum
        else:  # only zero-weight items left: split by remaining capacity
            share = {i: float(caps[i]) for i in free}
            denom = float(sum(caps[i] for i in free))
        if normalize_first:
            prop = {i: remaining * (share[i] / denom) for i in free}
        else:
            prop = {i: remaining * share[i] / denom for i in free}
        over = [i for i in free if prop[i] >= caps[i]]
        if not over:
            for i in free:
                ideal[i] = prop[i]
            break
        for i in over:
            ideal[i] = float(caps[i])
            remaining -= caps[i]
            free.remove(i)

    shares = [min(caps[i], math.floor(ideal[i] + 1e-9)) for i in range(k)]
    left = total - sum(shares)
    order = sorted(range(k), key=lambda i: (-(ideal[i] - shares[i]), i))
    while left > 0:  # hand out leftover units by largest remainder, skipping full items
        progressed = False
        for i in order:
            if left == 0:
                break
            if shares[i] < caps[i]:
                shares[i] += 1
                left -= 1
                progressed = True
        if not progressed:  # pragma: no cover - impossible since total <= sum(caps)
            raise AssertionError(f"cannot place {left} units with caps {list(caps)}")
    return shares
