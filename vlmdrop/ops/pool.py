"""Uniform spatial average pooling of a token grid to an exact token count (the `pool` baseline).

Rule (deterministic, exact count for every 1 <= target <= h*w):
  1. rows r' = clamp(floor(sqrt(target * h / w) + 0.5), 1, min(h, target)), i.e. the row count of
     a grid with the input's aspect ratio and about `target` cells; if ceil(target / r') > w,
     r' = ceil(target / w) instead (a row cannot hold more than w cells).
  2. target = q * r' + rem: every output row gets q cells and `rem` evenly spread rows get q + 1
     (row i gets the extra cell when floor((i+1)*rem/r') > floor(i*rem/r')).
  3. Output row i averages source rows [floor(i*h/r'), ceil((i+1)*h/r')); its j-th of w_i cells
     averages source columns [floor(j*w/w_i), ceil((j+1)*w/w_i)) -- the bin edges of
     torch.nn.functional.adaptive_avg_pool2d, so regions may overlap by one row/column when the
     sizes do not divide.
Consequences: when rem == 0 the result equals adaptive_avg_pool2d to (r', target / r');
target == h*w is the identity (returned as a copy); output order is raster (row by row).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def _row_count(h: int, w: int, target: int) -> int:
    rows = int(math.floor(math.sqrt(target * h / w) + 0.5))
    rows = max(1, min(rows, h, target))
    if -(-target // rows) > w:  # ceil(target / rows) > w
        rows = -(-target // w)
    return rows


def pool_groups(*, h: int, w: int, target: int) -> list[Tensor]:
    """Source raster indices averaged by each of the `target` outputs (raster order), see module doc."""
    flat, sizes = pool_index(h=h, w=w, target=target)
    return list(torch.split(flat.clone(), sizes.tolist()))


def pool_index(*, h: int, w: int, target: int) -> tuple[Tensor, Tensor]:
    """`pool_groups` flat: (S,) the groups' source indices one after the other, (target,) their sizes;
    computed without a loop over cells, once per (h, w, target) (shared, read-only tensors)."""
    return _pool_index(h, w, target)


@functools.lru_cache(maxsize=4096)
def _pool_index(h: int, w: int, target: int) -> tuple[Tensor, Tensor]:
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1x1, got h={h}, w={w}")
    if not 1 <= target <= h * w:
        raise ValueError(f"target must be in [1, h*w={h * w}], got {target}")
    rows = _row_count(h, w, target)
    q, rem = divmod(target, rows)
    i = torch.arange(rows)  # (r',) output rows
    cells = q + ((i + 1) * rem // rows - i * rem // rows)  # (r',) cells of each output row
    r0, r1 = i * h // rows, -(-(i + 1) * h // rows)  # (r',) source row bins
    row = torch.repeat_interleave(i, cells)  # (target,) output row of each cell
    j = torch.arange(target) - (torch.cumsum(cells, 0) - cells)[row]  # (target,) cell index inside its row
    n = cells[row]  # (target,)
    c0, c1 = j * w // n, -(-(j + 1) * w // n)  # (target,) source column bins
    width = c1 - c0  # (target,)
    sizes = (r1 - r0)[row] * width  # (target,) sources per cell
    cell = torch.repeat_interleave(torch.arange(target), sizes)  # (S,) cell of each source entry
    k = torch.arange(int(sizes.sum())) - (torch.cumsum(sizes, 0) - sizes)[cell]  # (S,) entry inside its cell
    flat = (r0[row][cell] + k // width[cell]) * w + c0[cell] + k % width[cell]  # (S,) raster, row-major per cell
    return flat, sizes


def pool_grid(tokens: Tensor, *, h: int, w: int, target: int) -> tuple[Tensor, list[Tensor]]:
    """Average-pool a raster token grid (h*w, C) to exactly `target` tokens.

    Returns (pooled (target, C) in tokens.dtype, groups: target LongTensors of the source indices
    each output averages). Means are accumulated in float32 (float64 for float64 input).
    """
    if tokens.dim() != 2 or tokens.shape[0] != h * w:
        raise ValueError(f"tokens must be (h*w={h * w}, C), got shape {tuple(tokens.shape)}")
    flat, sizes = pool_index(h=h, w=w, target=target)  # (S,), (target,)
    groups = list(torch.split(flat.clone(), sizes.tolist()))
    if target == h * w:
        return tokens.clone(), groups
    acc = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    out_idx = torch.repeat_interleave(torch.arange(target), sizes)  # (S,)
    weights = torch.zeros(target, h * w, dtype=acc)  # (target, h*w)
    weights[out_idx, flat] = 1.0 / sizes[out_idx].to(acc)
    weights = weights.to(tokens.device)
    pooled = weights @ tokens.to(acc)  # (target, C)
    return pooled.to(tokens.dtype), groups


def bounding_rectangle(local: Tensor, *, w: int) -> tuple[int, int, int, int]:
    """(r0, c0, rows, cols) of the rectangle that the raster indices `local` (n,) of a w-wide grid fill
    exactly; ValueError if they do not fill their bounding box."""
    if local.numel() == 0:
        raise ValueError("pool needs at least one token to find its rectangle, got none")
    r, c = local // w, local % w  # (n,), (n,)
    r0, c0 = int(r.min()), int(c.min())
    rows, cols = int(r.max()) - r0 + 1, int(c.max()) - c0 + 1
    if rows * cols != local.numel():
        raise ValueError(f"pool needs each crop's tokens to fill a rectangle; got {local.numel()} tokens "
                         f"in a {rows}x{cols} bounding box")
    return r0, c0, rows, cols


def token_grid(local: Tensor, *, w: int) -> tuple[Tensor, Tensor]:
    """(rows, cols): the ascending grid rows and columns whose product the raster indices `local` (n,) of a
    w-wide grid fill exactly -- a rectangle (`bounding_rectangle`), or, for LLaVA-OneVision's down-sampled
    grids, the anchor patches of the packed rows (every other row / column, say); ValueError otherwise."""
    if local.numel() == 0:
        raise ValueError("pool needs at least one token to find its grid, got none")
    rows, cols = (local // w).unique(), (local % w).unique()  # (R,), (C,) ascending
    if rows.numel() * cols.numel() != local.unique().numel() or local.unique().numel() != local.numel():
        raise ValueError(f"pool needs each crop's tokens to fill a grid; got {local.numel()} tokens on "
                         f"{rows.numel()} rows x {cols.numel()} columns")
    return rows, cols
