"""Geometry of AnyRes images: which sub-image region of the picture a base-image patch shows.

LLaVA-NeXT feeds the LLM a base image (the whole picture squashed to one crop) and a grid of
sub-images cut from the picture resized into the grid *with padding*; the padding is then removed
("unpadding").  The base image therefore covers exactly the unpadded content box of the full grid,
and a base patch at (r, c) of an h×w grid shows the content point
`(top + (r + ½)·H'/h, left + (c + ½)·W'/w)` in full-grid patch units.  This 2-D, unpad-aware map is
what HiRED's allocation needs (the official code uses raster row bands instead).

Extreme aspect ratios: a picture thinner than one patch of the full grid (e.g. 20×2000 px on
llava-v1.6's 336 px crops and 1×3 grid: 0.72 of a patch row) is unpadded to *nothing* along its
thin axis — the model itself then feeds the base image alone (20×2000: 576 rows) or the base image
and one newline per grid row (2000×20: 576 + 72 rows).  The content box is then empty (height or
width 0) at the centre of the collapsed axis, where unpadding cut; every base patch maps to the
sub-image row (column) there, and the sub-images hold no position to keep.
"""

from __future__ import annotations

import torch


def base_region_map(*, crop_hw: tuple[int, int], grid_hw: tuple[int, int],
                    content_box: tuple[int, int, int, int]) -> torch.Tensor:
    """Sub-image index (raster order over the grid, 0-based) of every base-image patch.

    Args:
        crop_hw: (h, w) patches per crop (the base image has the same grid).
        grid_hw: (gh, gw) sub-images down and across.
        content_box: (top, left, height, width) of the unpadded content inside the full
            (gh*h) × (gw*w) patch grid; height or width 0 (not both) when unpadding removed the
            whole grid (see the module docstring): every base row (column) then maps to the grid
            row (column) at `top` (`left`).

    Returns:
        (h*w,) long tensor, raster order over the base grid.
    """
    h, w = crop_hw
    gh, gw = grid_hw
    top, left, hh, ww = content_box
    if not (0 <= top and 0 <= left and top + hh <= gh * h and left + ww <= gw * w and hh >= 0 and ww >= 0
            and hh + ww > 0):
        raise ValueError(f"content_box {content_box} does not fit a {gh}x{gw} grid of {h}x{w} crops")
    ys = top + (torch.arange(h, dtype=torch.float64) + 0.5) * hh / h  # (h,) full-grid rows of base row centres
    xs = left + (torch.arange(w, dtype=torch.float64) + 0.5) * ww / w  # (w,)
    crop_r = (ys // h).long().clamp(0, gh - 1)  # (h,)
    crop_c = (xs // w).long().clamp(0, gw - 1)  # (w,)
    return (crop_r[:, None] * gw + crop_c[None, :]).reshape(-1)  # (h*w,)


def content_box_from_layout(crop_of: torch.Tensor, local_index: torch.Tensor, *, crop_hw: tuple[int, int],
                            grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the positions of sub-images 1.. inside the full patch grid.

    Args:
        crop_of, local_index: (n,) per-position crop (0 base, 1.. sub-images, -1 layout) and raster
            index inside the crop, as in `ImageTokens` (LLaVA-NeXT: one layout row, a newline, per
            row of the unpadded grid).

    When unpadding left no sub-image position, the box is empty along the collapsed axis, at its
    centre (`(gh*h) // 2` or `(gw*w) // 2`, where the model's unpadding cut), and full along the other:
    no newline row means no grid row survived (height collapsed), gh*h newline rows mean every row
    survived with no column (width collapsed).
    """
    h, w = crop_hw
    gh, gw = grid_hw
    sub = crop_of >= 1
    if not bool(sub.any()):
        n_layout = int((crop_of < 0).sum())
        if n_layout == 0:  # no grid row survived: the picture is thinner than one patch row
            return (gh * h) // 2, 0, 0, gw * w
        if n_layout == gh * h:  # every row survived as a bare newline: thinner than one patch column
            return 0, (gw * w) // 2, gh * h, 0
        raise ValueError(f"layout has no sub-image positions but {n_layout} layout rows; a {gh}x{gw} grid of "
                         f"{h}x{w} crops unpadded to nothing has 0 or {gh * h}")
    cell = crop_of[sub] - 1  # (n,)
    rows = (cell // gw) * h + local_index[sub] // w  # (n,) full-grid row
    cols = (cell % gw) * w + local_index[sub] % w  # (n,) full-grid column
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1
