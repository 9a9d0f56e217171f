"""VisionZip and `pool` per tile on InternVL (tiles, thumbnail last, pixel shuffle): the per-tile accounting
of new rows, the selection against the ops function fed with hand-built post-shuffle tensors, pool's regions.
Identity, exact counts, the rows the LLM receives (hand-merged / hand-pooled projector inputs through the
projector: forward, cache step, generate), eager vs sdpa, `remove()` and bf16 are grid cells
(`test_properties.py`, `references.py`)."""

import pytest
import torch
from conftest import batch, get_model
from references import internvl_post_shuffle

import vlmdrop
from vlmdrop.ops.visionzip import split_budget, visionzip_select

PROMPT = "USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:"
# tiny InternVL: 64 px tiles, 8x8 patches -> pixel shuffle 0.5 -> 4x4 = 16 tokens per tile, max_patches=6
ONE, THREE, MAX = (56, 56), (60, 130), (50, 300)  # 1 tile (no thumbnail); 2x1 + thumbnail; 1x6 + thumbnail
MIXED = [THREE, ONE, MAX]  # 3, 1, 7 tiles: left padding
SIZES = [ONE, THREE, (90, 50), MAX, (200, 100), (130, 120)]
TILES = [1, 3, 3, 7, 3, 5]
PER_TILE, SIDE, PATCH_SIDE = 16, 4, 8
METHODS = ["visionzip", "pool"]


def _inputs(proc, sizes=MIXED):
    return batch(proc, sizes, prompts=[PROMPT] * len(sizes))


def _tile_starts(tiles: list[int]) -> list[int]:
    starts = [0]
    for n in tiles:
        starts.append(starts[-1] + n)
    return starts


def test_pixel_shuffle_geometry_of_tiny_model():
    """The assumption the hand-built references rest on: post-shuffle token p (placeholder order) sits at
    raster (p // 4, p % 4) and concatenates the patches (2i + a, 2j + b), a, b in {0, 1}."""
    model, _ = get_model("internvl")
    idx = torch.arange(64, dtype=torch.float64).reshape(1, PATCH_SIDE, PATCH_SIDE, 1)
    src = model.model.pixel_shuffle(idx, scale_factor=0.5).reshape(PER_TILE, 4).long()  # (16, 4)
    for p in range(PER_TILE):
        i, j = divmod(p, SIDE)
        assert sorted(src[p].tolist()) == sorted((2 * i + a) * PATCH_SIDE + 2 * j + b for a in (0, 1) for b in (0, 1))


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.77, 7])
@pytest.mark.parametrize("method", METHODS)
def test_exact_counts_per_tile(method, budget):
    """Per-tile accounting of the new rows (the grid checks the per-image counts and rows)."""
    model, proc = get_model("internvl")
    inputs = _inputs(proc, SIZES)
    with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget) as h:
        model(**inputs)
    for s, n_tiles in zip(h.stats.images, TILES):
        assert s.n_before == n_tiles * PER_TILE
        assert len(s.crop_budgets) == n_tiles and s.crop_budgets == s.crop_kept and sum(s.crop_budgets) == s.n_kept
        assert max(s.crop_budgets) - min(s.crop_budgets) <= 1  # equal tiles: shares differ by one at most
        k = s.kept_indices
        groups = s.new_groups or []
        # each new row summarises positions of one tile; kept + new rows per tile = the tile's share
        tile_of_group = [int(g[0]) // PER_TILE for g in groups]
        assert all(bool((g // PER_TILE == t).all()) for g, t in zip(groups, tile_of_group))
        per_tile = torch.bincount(k // PER_TILE, minlength=n_tiles) + torch.bincount(
            torch.tensor(tile_of_group, dtype=torch.long), minlength=n_tiles)
        assert per_tile.tolist() == s.crop_budgets
        assert tile_of_group == sorted(tile_of_group)  # new rows tile by tile, thumbnail (last tile) last
        if method == "visionzip":
            assert s.n_new == sum(split_budget(c)[1] for c in s.crop_budgets if c < PER_TILE)
        else:  # pool: only whole tiles keep original positions; every tile with a smaller share is covered
            assert k.numel() == PER_TILE * sum(c == PER_TILE for c in s.crop_budgets)
            for t, c in enumerate(s.crop_budgets):
                if 0 < c < PER_TILE:
                    cover = torch.cat([g for g, tg in zip(groups, tile_of_group) if tg == t]).unique()
                    assert cover.tolist() == list(range(t * PER_TILE, (t + 1) * PER_TILE))


@pytest.mark.parametrize("budget,ratio", [(0.4, 5.4), (0.5, 1.0), (0.3, 0.5)])
def test_visionzip_selection_matches_ops_on_hand_built_tensors(budget, ratio):
    """Per tile: the ops function on eager CLS attention summed over 2x2 sources, keys averaged over heads
    and 2x2 sources, and the projector's input; tiles hold positions [16 t, 16 t + 16).  Small ratios give
    several contextual targets per tile, so the key similarity decides the groups."""
    model, proc = get_model("internvl", "eager")
    inputs = _inputs(proc)
    pre, cls, keys = internvl_post_shuffle(model, inputs["pixel_values"])
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=budget, ratio=ratio) as h:
        model(**inputs)
    starts = _tile_starts([s.n_before // PER_TILE for s in h.stats.images])
    for i, s in enumerate(h.stats.images):
        kept, groups = [], []
        for c, k in enumerate(s.crop_budgets):
            t = starts[i] + c
            d, ctx = split_budget(k, ratio=ratio)
            r = visionzip_select(cls[t], keys[t], pre[t], dominant=d, contextual=ctx)
            kept.extend((r.dominant_idx + c * PER_TILE).tolist())
            groups.extend((g + c * PER_TILE).tolist() for g in r.groups)
        assert s.kept_indices.tolist() == kept
        assert [g.tolist() for g in s.new_groups] == groups


def test_pool_regions_on_a_tile():
    """One tile (no thumbnail), 4x4 post-shuffle grid to 4 cells: 2x2 quadrants in raster order."""
    model, proc = get_model("internvl")
    inputs = _inputs(proc, [ONE])
    with torch.no_grad(), vlmdrop.dropping(model, "pool", budget=4) as h:
        model(**inputs)
    (s,) = h.stats.images
    assert s.crop_budgets == [4] and s.kept_indices.numel() == 0
    assert [g.tolist() for g in s.new_groups] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


