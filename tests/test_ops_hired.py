"""HiRED's allocation and selection as pure functions on hand-made attention maps."""

import pytest
import torch

from vlmdrop.ops.anyres import base_region_map, content_box_from_layout
from vlmdrop.ops.hired import crop_budgets, region_scores
from vlmdrop.ops.topk import top_k


def test_region_map_square_2x2():
    # 4x4 base grid over a 2x2 grid of 4x4 crops, no padding: each quadrant maps to its crop
    m = base_region_map(crop_hw=(4, 4), grid_hw=(2, 2), content_box=(0, 0, 8, 8)).reshape(4, 4)
    assert m.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_region_map_non_square_unpadded():
    # 1x2 grid (wide image) of 4x4 crops = full grid 4x8; the picture only fills rows 1..2 (height 2) after
    # unpadding.  The squashed base image still covers the whole picture: left half -> crop 0, right -> 1.
    m = base_region_map(crop_hw=(4, 4), grid_hw=(1, 2), content_box=(1, 0, 2, 8)).reshape(4, 4)
    assert m.tolist() == [[0, 0, 1, 1]] * 4
    # 2x1 grid (tall image), content width 3 of 4 centred, content height 8: top half -> crop 0
    m = base_region_map(crop_hw=(4, 4), grid_hw=(2, 1), content_box=(0, 0, 8, 3)).reshape(4, 4)
    assert m.tolist() == [[0] * 4, [0] * 4, [1] * 4, [1] * 4]
    # 3x1 grid but the picture covers only 7 of 12 rows starting at row 2: base rows map through the content
    m = base_region_map(crop_hw=(4, 4), grid_hw=(3, 1), content_box=(2, 0, 7, 4)).reshape(4, 4)
    # base row centres at 2 + (r + .5) * 7/4 = 2.875, 4.625, 6.375, 8.125 -> crops 0, 1, 1, 2
    assert m[:, 0].tolist() == [0, 1, 1, 2]


def test_region_map_rejects_bad_box():
    with pytest.raises(ValueError, match="content_box"):
        base_region_map(crop_hw=(4, 4), grid_hw=(1, 2), content_box=(0, 0, 5, 8))


def test_content_box_from_layout():
    # 1x2 grid of 2x2 crops, unpadded to the bottom row only
    crop_of = torch.tensor([1, 1, 2, 2, -1])
    local = torch.tensor([2, 3, 2, 3, -1])
    assert content_box_from_layout(crop_of, local, crop_hw=(2, 2), grid_hw=(1, 2)) == (1, 0, 1, 4)


def test_content_box_when_unpadding_removes_the_grid():
    # 1x3 grid of 2x2 crops (full grid 2x6), a picture thinner than one patch row: no position, no newline
    base_only = torch.zeros(4, dtype=torch.long)
    assert content_box_from_layout(base_only, torch.arange(4), crop_hw=(2, 2), grid_hw=(1, 3)) == (1, 0, 0, 6)
    # 3x1 grid (full grid 6x2), thinner than one patch column: every row survives as a bare newline
    crop_of = torch.tensor([0] * 4 + [-1] * 6)
    local = torch.tensor([0, 1, 2, 3] + [-1] * 6)
    assert content_box_from_layout(crop_of, local, crop_hw=(2, 2), grid_hw=(3, 1)) == (0, 1, 6, 0)
    with pytest.raises(ValueError, match="no sub-image positions but 3 layout rows.*0 or 6"):
        content_box_from_layout(crop_of[:7], local[:7], crop_hw=(2, 2), grid_hw=(3, 1))


def test_region_map_of_a_collapsed_box():
    # the empty box still maps the base image along its full axis: columns -> crops 0, 1, 2 of a 1x3 grid
    m = base_region_map(crop_hw=(3, 3), grid_hw=(1, 3), content_box=(1, 0, 0, 9)).reshape(3, 3)
    assert m.tolist() == [[0, 1, 2]] * 3
    m = base_region_map(crop_hw=(3, 3), grid_hw=(3, 1), content_box=(0, 1, 9, 0)).reshape(3, 3)
    assert m.tolist() == [[0] * 3, [1] * 3, [2] * 3]
    # a 2x2 grid collapsed in height: every base row maps to the crop row where unpadding cut (row 3 of 6 -> 1)
    m = base_region_map(crop_hw=(3, 3), grid_hw=(2, 2), content_box=(3, 0, 0, 6)).reshape(3, 3)
    assert m.tolist() == [[2, 3, 3]] * 3  # column centres 1, 3, 5 of 6 -> crop columns 0, 1, 1
    with pytest.raises(ValueError, match="content_box"):
        base_region_map(crop_hw=(3, 3), grid_hw=(2, 2), content_box=(3, 3, 0, 0))


def test_region_scores_sum_inside_regions():
    attn = torch.tensor([0.1, 0.2, 0.3, 0.4])
    region = torch.tensor([0, 1, 1, 2])
    assert torch.allclose(region_scores(attn, region, 3), torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64))


def test_crop_budgets_paper_rule():
    # alpha 0.5 of 20 -> base 10; the rest 10 split 1:3 -> 2.5, 7.5 -> largest remainder gives the tie to crop 1
    assert crop_budgets(20, [16, 16, 16], alpha=0.5, sub_scores=torch.tensor([1.0, 3.0])) == [10, 3, 7]
    # capped: sub-image 2 has only 4 positions left after unpadding; its surplus 3.5 is re-split 0.5:0.125
    # over the others: 16 * [0.8, 0.2] = [12.8, 3.2] -> [13, 3]
    assert crop_budgets(20, [16, 16, 4], alpha=0.5, sub_scores=torch.tensor([1.0, 3.0])) == [13, 3, 4]
    # no sub-images: everything to the base image
    assert crop_budgets(7, [16], alpha=0.5, sub_scores=None) == [7]
    # all-zero scores -> uniform split
    assert crop_budgets(10, [16, 16, 16], alpha=0.6, sub_scores=torch.zeros(2)) == [6, 2, 2]


def test_crop_budgets_sum_exactly():
    for total in range(0, 49):
        b = crop_budgets(total, [16, 12, 16, 8], alpha=0.3, sub_scores=torch.tensor([0.2, 0.5, 0.3]))
        assert sum(b) == total and all(x <= c for x, c in zip(b, [16, 12, 16, 8]))


def test_crop_budgets_errors():
    with pytest.raises(ValueError, match="alpha"):
        crop_budgets(5, [4, 4], alpha=1.5, sub_scores=torch.ones(1))
    with pytest.raises(ValueError, match="sub-image scores"):
        crop_budgets(5, [4, 4, 4], alpha=0.5, sub_scores=torch.ones(1))


def test_top_k_ties_and_order():
    s = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert top_k(s, 2).tolist() == [1, 3]
    assert top_k(s, 3).tolist() == [1, 2, 3]
    assert top_k(torch.ones(4), 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="k=6"):
        top_k(s, 6)


def test_hired_method_on_hand_made_image():
    """A hand-made non-square LLaVA-NeXT image: 2x2 crops, 1x2 grid, unpadded to one row, newlines."""
    from vlmdrop.interface import ImageTokens
    from vlmdrop.methods.hired import Hired, HiredConfig

    # positions: base (4), then unpadded grid row 1 of the 2x4 full grid: crop1 patches 2,3, crop2 patches 2,3, newline
    crop_of = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, -1])
    local = torch.tensor([0, 1, 2, 3, 2, 3, 2, 3, -1])
    first = torch.zeros(3, 2, 4)
    first[0, 0] = torch.tensor([0.1, 0.6, 0.1, 0.2])  # base image attention: right half (crop 2) heavier
    feature = torch.zeros(3, 2, 4)
    feature[0, 1] = torch.tensor([0.4, 0.1, 0.3, 0.2])
    feature[1, 0] = torch.tensor([0.9, 0.9, 0.1, 0.2])  # patches 0,1 are unpadded away: must never be chosen
    feature[2, 0] = torch.tensor([0.0, 0.0, 0.7, 0.3])
    box = content_box_from_layout(crop_of, local, crop_hw=(2, 2), grid_hw=(1, 2))
    assert box == (1, 0, 1, 4)
    region = base_region_map(crop_hw=(2, 2), grid_hw=(1, 2), content_box=box)
    assert region.tolist() == [0, 1, 0, 1]
    img = ImageTokens(n_before=9, crop_of=crop_of, local_index=local, crop_hw=(2, 2), n_crops=3,
                      cls_attn={"first": first, "feature": feature}, base_region=region)
    sel = Hired(HiredConfig(budget=4, alpha=0.5)).select(img, 4)
    # base gets 2 (top feature: patches 0 and 2), subs share 2 by s = [0.2, 0.8] -> [0.4, 1.6] -> [0, 2]
    assert sel.crop_budgets == [2, 0, 2]
    assert sel.kept_indices.tolist() == [0, 2, 6, 7]
    # budget 1.0: everything, newline included
    full = Hired(HiredConfig(budget=1.0)).select(img, 9)
    assert full.kept_indices.tolist() == list(range(9)) and full.crop_budgets == [4, 2, 2]
