"""Geometry of AnyRes images: which sub-image region of the picture a base-image patch shows.

LLaVA-NeXT feeds the LLM a base image (the whole picture squashed to one crop) and a grid of
sub-images cut from the picture resized into the grid *with padding*; the padding is then removed
("unpadding").  The base image therefore covers exactly the unpadded content box of the full grid,
and a base patch at (r, c) of an h×w grid shows the content point
`(top + (r + ½)·H'/h, left + (c + ½)·W'/w)` in full-grid patch units.  This 2-D, unpad-aware map is
what HiRED's allocation needs (the official code uses raster row bands instead).
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
            (gh*h) × (gw*w) patch grid.

    Returns:
        (h*w,) long tensor, raster order over the base grid.
    """
    h, w = crop_hw
    gh, gw = grid_hw
    top, left, hh, ww = content_box
    if not (0 <= top and 0 <= left and top + hh <= gh * h and left + ww <= gw * w and hh > 0 and ww > 0):
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
            index inside the crop, as in `ImageTokens`.
    """
    h, w = crop_hw
    gh, gw = grid_hw
    sub = crop_of >= 1
    if not bool(sub.any()):
        raise ValueError("layout has no sub-image positions")
    cell = crop_of[sub] - 1  # (n,)
    rows = (cell // gw) * h + local_index[sub] // w  # (n,) full-grid row
    cols = (cell % gw) * w + local_index[sub] % w  # (n,) full-grid column
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1
