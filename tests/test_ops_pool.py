import pytest
import torch
import torch.nn.functional as F

from vlmdrop.ops.pool import bounding_rectangle, pool_grid


def _adaptive(tokens, h, w, oh, ow):
    grid = tokens.T.reshape(1, -1, h, w)  # (1, C, h, w)
    return F.adaptive_avg_pool2d(grid, (oh, ow)).reshape(tokens.shape[1], -1).T  # (oh*ow, C)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 7), (24, 24), (1, 9), (9, 1)])
def test_exact_count_for_every_target(h, w):
    tokens = torch.randn(h * w, 3)
    big = [1, 2, 3, 5, 23, 25, 63, 64, 65, 143, 144, 145, 287, 289, 575, 576]
    targets = range(1, h * w + 1) if h * w <= 64 else big
    for target in targets:
        pooled, groups = pool_grid(tokens, h=h, w=w, target=target)
        assert pooled.shape == (target, 3)
        assert len(groups) == target
        covered = torch.cat(groups).unique()
        assert covered.tolist() == list(range(h * w))  # every source token is used


def test_identity_at_full_size():
    tokens = torch.randn(12, 4)
    pooled, groups = pool_grid(tokens, h=3, w=4, target=12)
    assert torch.equal(pooled, tokens)
    assert [g.tolist() for g in groups] == [[i] for i in range(12)]


def test_hand_computed_2x3():
    tokens = torch.arange(6, dtype=torch.float32).unsqueeze(1)  # grid [[0,1,2],[3,4,5]]
    pooled, groups = pool_grid(tokens, h=2, w=3, target=3)  # 1 row of 3 cells: column means
    assert [g.tolist() for g in groups] == [[0, 3], [1, 4], [2, 5]]
    assert pooled.squeeze(1).tolist() == [1.5, 2.5, 3.5]
    # target 5: 2 rows, row 0 gets 2 cells (adaptive bins [0,2) and [1,3)), row 1 gets 3
    pooled, groups = pool_grid(tokens, h=2, w=3, target=5)
    assert [g.tolist() for g in groups] == [[0, 1], [1, 2], [3], [4], [5]]
    assert pooled.squeeze(1).tolist() == [0.5, 1.5, 3.0, 4.0, 5.0]
    pooled, _ = pool_grid(tokens, h=2, w=3, target=1)
    assert pooled.squeeze(1).tolist() == [2.5]


@pytest.mark.parametrize("h,w,target,oh,ow",
                         [(24, 24, 144, 12, 12), (5, 7, 12, 3, 4), (6, 6, 9, 3, 3), (24, 24, 64, 8, 8)])
def test_equals_adaptive_avg_pool_when_grid_is_regular(h, w, target, oh, ow):
    tokens = torch.randn(h * w, 5, dtype=torch.float64)
    pooled, _ = pool_grid(tokens, h=h, w=w, target=target)
    assert torch.allclose(pooled, _adaptive(tokens, h, w, oh, ow))


def test_keeps_aspect_ratio():
    _, groups = pool_grid(torch.zeros(12 * 48, 1), h=12, w=48, target=36)  # 3 rows x 12 cells
    assert all(g.numel() == 16 for g in groups)  # each cell is 4 x 4 source tokens


def test_errors_carry_values():
    with pytest.raises(ValueError, match="got 7"):
        pool_grid(torch.zeros(6, 1), h=2, w=3, target=7)
    with pytest.raises(ValueError, match="got 0"):
        pool_grid(torch.zeros(6, 1), h=2, w=3, target=0)
    with pytest.raises(ValueError, match=r"\(5, 1\)"):
        pool_grid(torch.zeros(5, 1), h=2, w=3, target=2)


@pytest.mark.parametrize("w,r0,c0,rows,cols", [(1, 0, 0, 1, 1), (5, 1, 2, 3, 2), (4, 0, 0, 4, 4), (7, 3, 0, 1, 7)])
def test_bounding_rectangle_brute_force(w, r0, c0, rows, cols):
    local = torch.tensor([(r0 + i) * w + c0 + j for i in range(rows) for j in range(cols)])
    assert bounding_rectangle(local[torch.randperm(local.numel())], w=w) == (r0, c0, rows, cols)


def test_bounding_rectangle_rejects_holes_and_empty():
    with pytest.raises(ValueError, match="3 tokens in a 2x2 bounding box"):
        bounding_rectangle(torch.tensor([0, 1, 4]), w=3)
    with pytest.raises(ValueError, match="got none"):
        bounding_rectangle(torch.tensor([], dtype=torch.long), w=3)


def test_token_grid_takes_sub_lattices_and_rejects_the_rest():
    from vlmdrop.ops.pool import token_grid

    local = torch.tensor([r * 7 + c for r in (0, 2, 5) for c in (1, 3, 4, 6)])  # rows 0,2,5 x cols 1,3,4,6 of 7 wide
    rows, cols = token_grid(local[torch.randperm(local.numel())], w=7)
    assert rows.tolist() == [0, 2, 5] and cols.tolist() == [1, 3, 4, 6]
    assert [t.tolist() for t in token_grid(torch.arange(8, 12), w=4)] == [[2], [0, 1, 2, 3]]  # a rectangle
    with pytest.raises(ValueError, match="fill a grid"):
        token_grid(torch.tensor([0, 1, 7]), w=7)
