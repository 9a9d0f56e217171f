import math

import pytest
import torch

from vlmdrop.ops.globalcom2 import (
    crop_keep_counts,
    crop_retention,
    crop_token_scores,
    official_crop_boxes,
    official_region_map,
    stitched_crop_boxes,
)


def test_region_map_blocks_and_leftovers():
    assert official_region_map(4, 4, n_rows=2, n_cols=2).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # 5 rows into 2 block rows of 2: the leftover row joins the last block row
    assert official_region_map(5, 3, n_rows=2, n_cols=1)[:, 0].tolist() == [0, 0, 1, 1, 1]
    assert official_region_map(24, 24, n_rows=1, n_cols=3)[0, ::8].tolist() == [0, 1, 2]


def test_retention_equal_scores_give_base_ratio():
    attn = torch.ones(4, 4)
    r = crop_retention(attn, official_region_map(4, 4, n_rows=2, n_cols=2), 4)
    assert torch.allclose(r, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-12)


def test_retention_softmax_with_temperature_and_clip():
    # s = [0, 10 ln 3], T = 10 -> softmax [1/4, 3/4] -> 0.25 * (1 -+ 0.25)
    attn = torch.tensor([[0.0, 10 * math.log(3)]])
    region = torch.tensor([[0, 1]])
    r = crop_retention(attn, region, 2)
    assert torch.allclose(r, torch.tensor([0.1875, 0.3125], dtype=torch.float64), atol=1e-7)
    r = crop_retention(attn, region, 2, base_ratio=1.0)  # 1.25 is clipped to 1
    assert torch.allclose(r, torch.tensor([0.75, 1.0], dtype=torch.float64), atol=1e-7)
    # a crop without thumbnail tokens has s = 0
    r = crop_retention(attn, region, 3, temperature=1e9)
    assert torch.allclose(r, torch.full((3,), 0.25, dtype=torch.float64), atol=1e-7)


def test_retention_errors_carry_values():
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        crop_retention(torch.ones(1, 2), torch.tensor([[0, 5]]), 2)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        crop_retention(torch.ones(1, 2), torch.tensor([[0, 1]]), 2, temperature=0)


def test_token_scores_bilinear_and_l2():
    thumb = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # resized to 4x4: 2*y + x, y, x in {0, .25, .75, 1}
    local = torch.tensor([3.0, 0.0, 0.0, 4.0])
    s = crop_token_scores(local, thumb, full_hw=(4, 4), crop_rows=(0, 2), crop_cols=(2, 4))
    g = torch.tensor([0.75, 1.0, 1.25, 1.5])
    expected = torch.tensor([0.6, 0.0, 0.0, 0.8]) + g / math.sqrt(5.375)
    assert torch.allclose(s, expected, atol=1e-6)


def test_token_scores_errors_carry_values():
    with pytest.raises(ValueError, match="has 3 scores"):
        crop_token_scores(torch.ones(3), torch.ones(2, 2), full_hw=(4, 4), crop_rows=(0, 2), crop_cols=(0, 2))
    with pytest.raises(ValueError, match=r"\(0, 5\)"):
        crop_token_scores(torch.ones(10), torch.ones(2, 2), full_hw=(4, 4), crop_rows=(0, 5), crop_cols=(0, 2))


def test_crop_boxes_unpad_rows_and_cols():
    full, boxes, local = official_crop_boxes((200, 600), n_rows=1, n_cols=2, side=24)
    assert full == (16, 48)  # pad = (24 - int(200 * 48 / 600)) // 2 = 4 rows top and bottom
    assert boxes == [(0, 16, 0, 24), (0, 16, 24, 48)]
    assert local == [(4, 20, 0, 24), (4, 20, 0, 24)]
    full, boxes, local = official_crop_boxes((100, 50), n_rows=2, n_cols=2, side=4)
    assert full == (8, 4)  # 2 columns cut left and right
    assert boxes == [(0, 4, 0, 2), (0, 4, 2, 4), (4, 8, 0, 2), (4, 8, 2, 4)]
    assert local == [(0, 4, 2, 4), (0, 4, 0, 2), (0, 4, 2, 4), (0, 4, 0, 2)]
    full, boxes, _ = official_crop_boxes((300, 600), n_rows=1, n_cols=2, side=24)
    assert full == (24, 48) and boxes[1] == (0, 24, 24, 48)


def test_keep_counts_official_floor_and_exact():
    assert crop_keep_counts([576, 576], [0.1875, 0.3125]) == [108, 180]
    assert crop_keep_counts([10, 10], [0.25, 0.35]) == [2, 3]
    # exact: quotas 112.5, 187.5 -> floors 112, 187, one left -> tie -> lower index
    assert crop_keep_counts([576, 576], [0.1875, 0.3125], total=300) == [113, 187]
    # cap: crop 0 saturates at 10, the rest goes to crop 1
    assert crop_keep_counts([10, 100], [1.0, 0.1], total=30) == [10, 20]
    assert crop_keep_counts([5, 5], [0.0, 0.0], total=4) == [2, 2]
    assert crop_keep_counts([3, 7], [0.5, 0.5], total=10) == [3, 7]


def test_keep_counts_errors_carry_values():
    with pytest.raises(ValueError, match="got 11"):
        crop_keep_counts([5, 5], [0.5, 0.5], total=11)
    with pytest.raises(ValueError, match="1.5"):
        crop_keep_counts([5, 5], [0.5, 1.5])
    with pytest.raises(ValueError, match="2 crops but 1 ratios"):
        crop_keep_counts([5, 5], [0.5])


def test_stitched_crop_boxes_hand_computed():
    # 1x2 sub-images of 2x3 tokens; unpadding kept only row 1 of each crop -> stitched grid 1x6
    local = [torch.tensor([3, 4, 5]), torch.tensor([3, 4, 5])]
    boxes = stitched_crop_boxes(local, crop_hw=(2, 3), grid_hw=(1, 2))
    assert boxes == {0: ((1, 6), (0, 1), (0, 3)), 1: ((1, 6), (0, 1), (3, 6))}
    # 2x1 sub-images of 2x2 tokens, columns 1.. kept, the second crop empty
    boxes = stitched_crop_boxes([torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)], crop_hw=(2, 2),
                                grid_hw=(2, 1))
    assert boxes == {0: ((2, 1), (0, 2), (0, 1))}
    assert stitched_crop_boxes([torch.tensor([], dtype=torch.long)], crop_hw=(2, 2), grid_hw=(1, 1)) == {}


@pytest.mark.parametrize("seed", range(20))
def test_stitched_crop_boxes_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = (int(x) for x in torch.randint(1, 6, (2,), generator=g))
    gh, gw = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
    big_h, big_w = gh * h, gw * w
    r0, c0 = int(torch.randint(0, big_h, (1,), generator=g)), int(torch.randint(0, big_w, (1,), generator=g))
    r1 = int(torch.randint(r0 + 1, big_h + 1, (1,), generator=g))
    c1 = int(torch.randint(c0 + 1, big_w + 1, (1,), generator=g))
    kept = torch.zeros(big_h, big_w, dtype=torch.bool)  # (gh*h, gw*w) the unpadded content box
    kept[r0:r1, c0:c1] = True
    local, want = [], {}
    for j in range(gh * gw):
        crop = kept[(j // gw) * h:(j // gw + 1) * h, (j % gw) * w:(j % gw + 1) * w]  # (h, w)
        local.append(crop.reshape(-1).nonzero().reshape(-1))
        rows, cols = crop.any(1).nonzero().reshape(-1), crop.any(0).nonzero().reshape(-1)
        if rows.numel():
            top, left = (j // gw) * h + int(rows[0]) - r0, (j % gw) * w + int(cols[0]) - c0
            want[j] = ((r1 - r0, c1 - c0), (top, top + rows.numel()), (left, left + cols.numel()))
    assert stitched_crop_boxes(local, crop_hw=(h, w), grid_hw=(gh, gw)) == want


def test_stitched_crop_boxes_errors_carry_values():
    with pytest.raises(ValueError, match="2x2 does not hold the 3"):
        stitched_crop_boxes([torch.tensor([0])] * 3, crop_hw=(2, 2), grid_hw=(2, 2))


def test_crop_token_scores_on_a_sub_grid_reads_the_resized_map_at_its_rows_and_cols():
    """LLaVA-OneVision's anchors: a crop's tokens on stitched rows (0, 2) and cols (1, 3) of a 4x4 box."""
    from vlmdrop.ops.globalcom2 import stitched_crop_grids

    g = torch.Generator().manual_seed(0)
    thumb, local = torch.rand(4, 4, generator=g), torch.rand(4, generator=g)
    (full, rows, cols), = stitched_crop_grids([torch.tensor([1, 3, 9, 11])], crop_hw=(4, 4), grid_hw=(1, 1)).values()
    assert full == (3, 3) and rows.tolist() == [0, 2] and cols.tolist() == [0, 2]
    rows, cols = torch.tensor([0, 2]), torch.tensor([1, 3])
    got = crop_token_scores(local, thumb, full_hw=(4, 4), crop_rows=rows, crop_cols=cols)
    resized = torch.nn.functional.interpolate(thumb[None, None], size=(4, 4), mode="bilinear")[0, 0]
    glob = resized[[0, 0, 2, 2], [1, 3, 1, 3]]
    torch.testing.assert_close(got, local / local.norm() + glob / glob.norm())
    with pytest.raises(ValueError, match="has 4 tokens"):
        crop_token_scores(local[:3], thumb, full_hw=(4, 4), crop_rows=rows, crop_cols=cols)
