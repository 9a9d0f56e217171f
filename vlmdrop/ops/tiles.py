"""InternVL dynamic tiling: recovering an image's tile grid from its pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infer_tile_grid(tiles: torch.Tensor, thumbnail: torch.Tensor, *, side: int = 32) -> tuple[int, int]:
    """(rows, cols) of a raster of tiles that, stitched and resized to one tile, best matches the thumbnail.

    Every tile and the thumbnail are first average-pooled to `t` x `t` (`t` the largest divisor of the
    tile side that is at most `side`); a candidate raster of these small tiles, pooled to `t` x `t`, is
    then exactly the full-resolution stitch pooled to `t` x `t` (block means of equal blocks), so the
    comparison costs one pass over the pixels instead of one per candidate.

    Args:
        tiles: (n, C, S, S) the image's tiles in the processor's raster order (thumbnail excluded).
        thumbnail: (C, S, S) the whole picture resized to one tile.
        side: the largest pooled side compared.

    Returns:
        (rows, cols) with rows * cols == n; ties go to the first candidate in order of increasing rows.
    """
    n, c, s, s2 = tiles.shape
    t = max(d for d in range(1, min(side, s, s2) + 1) if s % d == 0 and s2 % d == 0)
    small_tiles = F.adaptive_avg_pool2d(tiles.float(), (t, t))  # (n, C, t, t)
    thumb = F.adaptive_avg_pool2d(thumbnail.float()[None], (t, t))  # (1, C, t, t)
    best, best_err = None, float("inf")
    for rows in range(1, n + 1):  # the divisors of n: at most a few dozen candidates, each on t x t tiles
        if n % rows:
            continue
        cols = n // rows
        grid = small_tiles.reshape(rows, cols, c, t, t).permute(2, 0, 3, 1, 4).reshape(1, c, rows * t, cols * t)
        err = float((F.adaptive_avg_pool2d(grid, (t, t)) - thumb).pow(2).mean())
        if err < best_err:
            best, best_err = (rows, cols), err
    assert best is not None
    return best


# ------------------------------------------------------------------ pixel shuffle
# InternVL's `pixel_shuffle` merges each k = 1/r² block of ViT patches (r the downsample ratio) into one
# token by concatenating their channels.  Running it on a grid of patch ids gives, for every
# post-shuffle token, the ids of its source patches; the functions below turn that into index maps.


def patch_ids(h: int, w: int) -> torch.Tensor:
    """(1, h, w, 1) float64 grid of patch ids 0..h*w-1 in raster order, the input for a model's own
    `pixel_shuffle` (float64 holds the ids exactly)."""
    if h < 1 or w < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {h}x{w}")
    return torch.arange(h * w, dtype=torch.float64).reshape(1, h, w, 1)  # (1, h, w, 1)


def shuffle_source_map(shuffled: torch.Tensor, *, patch_hw: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Index maps of a pixel shuffle, from its output on `patch_ids(*patch_hw)`.

    Args:
        shuffled: (1, h', w', k) the shuffle's output on the patch-id grid.
        patch_hw: (h, w) the ViT patch grid.

    Returns:
        sources: (N', k) long, the source patch ids of each post-shuffle token, N' = h'·w', in the
            shuffle's output (feature) order;
        local: (N',) long, each token's raster index on the h' x w' grid (mean source row and column,
            scaled to that grid);
        (h', w').
    """
    h, w = patch_hw
    if shuffled.dim() != 4 or shuffled.shape[0] != 1:
        raise ValueError(f"shuffled must be (1, h', w', k), got {tuple(shuffled.shape)}")
    hh, ww = shuffled.shape[1], shuffled.shape[2]
    sources = shuffled.reshape(hh * ww, -1).round().long()  # (N', k) in feature order
    if sources.numel() and (sources.min() < 0 or sources.max() >= h * w):
        raise ValueError(f"shuffled holds patch ids in [{int(sources.min())}, {int(sources.max())}], "
                         f"outside the {h}x{w} patch grid")
    rows = (sources // w).double().mean(-1)  # (N',) mean source row
    cols = (sources % w).double().mean(-1)  # (N',)
    local = (rows * hh / h).floor().long() * ww + (cols * ww / w).floor().long()  # (N',) post-shuffle raster
    if not torch.equal(local.sort().values, torch.arange(hh * ww)):
        raise ValueError(f"pixel_shuffle source map is not a permutation of the {hh}x{ww} grid")
    return sources, local, (int(hh), int(ww))


def to_raster(by_token: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """(T, N', X) post-shuffle tokens in feature order -> the same in post-shuffle raster order
    (`local`, (N',), the raster index of each)."""
    out = torch.empty_like(by_token)  # (T, N', X)
    out[:, local.to(by_token.device)] = by_token
    return out


def pool_patch_scores(scores: torch.Tensor, sources: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """(..., h*w) per-patch scores -> (..., N') per post-shuffle token in raster order: the sum over its
    source patches (`sources` (N', k), `local` (N',) from `shuffle_source_map`)."""
    by_token = scores[..., sources.to(scores.device)].sum(-1)  # (..., N', k) -> (..., N') feature order
    out = torch.empty_like(by_token)  # (..., N')
    out[..., local.to(scores.device)] = by_token
    return out


def pool_patch_features(feats: torch.Tensor, sources: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """(T, h*w, C) per-patch features -> (T, N', C) per post-shuffle token in raster order: the mean
    over its source patches (`sources` (N', k), `local` (N',) from `shuffle_source_map`)."""
    by_token = feats[:, sources.to(feats.device)].mean(2)  # (T, N', k, C) -> (T, N', C) feature order
    return to_raster(by_token, local)
