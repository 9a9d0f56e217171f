import pytest
import torch

from vlmdrop.ops.hired_official import official_crop_budgets, official_select, official_total_budget


def _attn_with_top(n: int, top: list[int]) -> torch.Tensor:
    """(n,) scores whose top-len(top) set is exactly `top` (distinct values, no ties)."""
    a = torch.arange(n, dtype=torch.float32) * 1e-3  # (n,) small, distinct
    a[top] += 1.0 + torch.arange(len(top), dtype=torch.float32)
    return a


def test_total_budget_matches_official_float_order():
    assert official_total_budget(5, tokens_per_crop=576, rate=0.2) == 576
    assert official_total_budget(3, tokens_per_crop=576, rate=0.2) == 345  # int(345.6)
    assert official_total_budget(5, tokens_per_crop=576, rate=1.0) == 2880


def test_counts_per_row_band_and_floor():
    # 4x4 base grid, 2x2 crops -> 4 bands of 4 tokens = base rows 0, 1, 2, 3.
    # top 8 (alpha 0.5): 4 in row 0, 3 in row 1, 1 in row 2, 0 in row 3.
    attn = _attn_with_top(16, [0, 1, 2, 3, 4, 5, 6, 8])
    assert official_crop_budgets(attn, n_sub=4, total_budget=16, alpha=0.5) == [8, 4, 3, 1, 0]
    # B=13: base int(6.5)=6, sub 7; 7*4/8=3.5->3, 7*3/8=2.625->2, 0.875->0, 0 -> 11 kept of 13
    assert official_crop_budgets(attn, n_sub=4, total_budget=13, alpha=0.5) == [6, 3, 2, 0, 0]


def test_row_bands_not_quadrants():
    # top tokens form the left column of a 4x4 grid: 2-D quadrants would give everything to
    # the two left crops; the official row bands give every crop the same share.
    attn = _attn_with_top(16, [0, 4, 8, 12, 1, 5, 9, 13])
    assert official_crop_budgets(attn, n_sub=4, total_budget=16, alpha=0.5) == [8, 2, 2, 2, 2]


def test_cap_at_crop_size_without_redistribution():
    # N=4, 2 sub-images (bands of 2); top 2 both in band 0; rate 1.0 -> B=12
    attn = _attn_with_top(4, [0, 1])
    assert official_crop_budgets(attn, n_sub=2, total_budget=12, alpha=0.5) == [4, 4, 0]


def test_no_sub_budget():
    attn = _attn_with_top(16, [0])
    assert official_crop_budgets(attn, n_sub=4, total_budget=4, alpha=1.0) == [4, 0, 0, 0, 0]


def test_no_sub_budget_any_band_split():
    # N=10 is not divisible into 4 or 3 bands, but with a zero sub-image budget the official code
    # never splits the base grid (MLN L549): the base keeps its share, every sub-image 0.
    assert official_crop_budgets(torch.rand(10), n_sub=4, total_budget=6, alpha=1.0) == [6, 0, 0, 0, 0]
    assert official_crop_budgets(torch.rand(10), n_sub=3, total_budget=10, alpha=1.0) == [10, 0, 0, 0]
    assert official_crop_budgets(torch.rand(10), n_sub=3, total_budget=0, alpha=0.5) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="N=10.*sub-image budget 1"):  # base min(11, 10) = 10, sub 1 > 0
        official_crop_budgets(torch.rand(10), n_sub=3, total_budget=11, alpha=1.0)


def test_errors_carry_values():
    with pytest.raises(ValueError, match="N=10"):
        official_crop_budgets(torch.rand(10), n_sub=4, total_budget=8, alpha=0.5)
    with pytest.raises(ValueError, match="alpha=1.0"):
        official_crop_budgets(torch.rand(16), n_sub=4, total_budget=20, alpha=1.0)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        official_crop_budgets(torch.rand(4, 4), n_sub=4, total_budget=8, alpha=0.5)
    with pytest.raises(ValueError, match="rate"):
        official_total_budget(5, tokens_per_crop=576, rate=1.5)


def test_select_is_topk_in_raster_order():
    attn = torch.tensor([[0.1, 0.9, 0.3, 0.8], [0.5, 0.1, 0.2, 0.0]])  # (2, 4)
    kept = official_select(attn, [2, 1])
    assert [k.tolist() for k in kept] == [[1, 3], [0]]
    with pytest.raises(ValueError, match=r"\[5\]"):
        official_select(attn, [5, 1])
    with pytest.raises(ValueError, match="1 budgets for 2 crops"):
        official_select(attn, [1])
