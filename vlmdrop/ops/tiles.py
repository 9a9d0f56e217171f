"""InternVL dynamic tiling: recovering an image's tile grid from its pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infer_tile_grid(tiles: torch.Tensor, thumbnail: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of a raster of tiles that, stitched and resized to one tile, best matches the thumbnail.

    Args:
        tiles: (n, C, S, S) the image's tiles in the processor's raster order (thumbnail excluded).
        thumbnail: (C, S, S) the whole picture resized to one tile.

    Returns:
        (rows, cols) with rows * cols == n; ties go to the first candidate in order of increasing rows.
    """
    n, c, s, s2 = tiles.shape
    best, best_err = None, float("inf")
    thumb = thumbnail.float()[None]  # (1, C, S, S)
    for rows in range(1, n + 1):
        if n % rows:
            continue
        cols = n // rows
        grid = tiles.float().reshape(rows, cols, c, s, s2).permute(2, 0, 3, 1, 4).reshape(1, c, rows * s, cols * s2)
        small = F.adaptive_avg_pool2d(grid, (s, s2))  # (1, C, S, S)
        err = float((small - thumb).pow(2).mean())
        if err < best_err:
            best, best_err = (rows, cols), err
    assert best is not None
    return best
