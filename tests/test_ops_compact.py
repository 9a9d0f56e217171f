import pytest
import torch

from vlmdrop.ops.compact import plan_compaction, recompact, slot_index


def _brute(rows, keep, where_prev, mask):
    """Python-loop reference of `recompact`: per row, the kept original positions right-aligned."""
    b, length = keep.shape
    kept = [[p for p in range(length) if keep[i, p]] for i in range(b)]
    l_s = max(len(k) for k in kept)
    src = torch.zeros(b, l_s, dtype=torch.long)
    valid = torch.zeros(b, l_s, dtype=torch.bool)
    where = torch.full((b, length), -1, dtype=torch.long)
    out = torch.zeros(b, l_s, rows.shape[-1], dtype=rows.dtype)
    new_mask = torch.zeros(b, l_s, dtype=torch.bool)
    for i, k in enumerate(kept):
        pad = l_s - len(k)
        for slot in range(l_s):
            out[i, slot] = rows[i, max(int(where_prev[i, 0]), 0)]  # padding: a copy of that row
        for j, p in enumerate(k):
            src[i, pad + j], valid[i, pad + j], where[i, p] = p, True, pad + j
            out[i, pad + j] = rows[i, where_prev[i, p]]
            new_mask[i, pad + j] = bool(mask[i, p])
    return src, valid, where, out, new_mask, torch.tensor([length - len(k) for k in kept])


def _check(rows, keep, where_prev, mask):
    got = recompact(rows, keep, where_prev=where_prev, mask=mask)
    src, valid, where, out, new_mask, removed = _brute(rows, keep, where_prev, mask)
    assert torch.equal(got.plan.src, src) and torch.equal(got.plan.valid, valid)
    assert torch.equal(got.where, where) and torch.equal(got.rows, out) and torch.equal(got.mask, new_mask)
    assert torch.equal(got.plan.removed, removed)
    return got


def test_recompact_hand_computed():
    rows = torch.arange(4.0).reshape(1, 4, 1).expand(2, 4, 1).clone()  # (2, 4, 1) row i holds i
    keep = torch.tensor([[True, False, True, True], [False, False, True, True]])
    mask = torch.tensor([[True, True, True, True], [False, True, True, True]])
    got = recompact(rows, keep, where_prev=torch.arange(4).expand(2, 4), mask=mask)
    assert got.plan.src.tolist() == [[0, 2, 3], [0, 2, 3]]
    assert got.plan.valid.tolist() == [[True, True, True], [False, True, True]]
    assert got.where.tolist() == [[0, -1, 1, 2], [-1, -1, 1, 2]]
    assert got.rows[..., 0].tolist() == [[0.0, 2.0, 3.0], [0.0, 2.0, 3.0]]
    assert got.mask.tolist() == [[True, True, True], [False, True, True]]
    assert got.plan.removed.tolist() == [1, 2]


@pytest.mark.parametrize("seed", range(12))
def test_recompact_twice_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    b, length, d = 3, 9, 2
    mask = torch.rand(b, length, generator=g) > 0.2
    rows = torch.randn(b, length, d, generator=g)
    keep1 = torch.rand(b, length, generator=g) > 0.3
    keep1[:, -1] = True  # the last prompt token always stays
    first = _check(rows, keep1, torch.arange(length).expand(b, length), mask)
    keep2 = keep1 & (torch.rand(b, length, generator=g) > 0.4)
    keep2[:, -1] = True
    second = _check(first.rows, keep2, first.where, mask)
    # the same as one compaction of the original batch (on the valid slots; padding is masked)
    direct = recompact(rows, keep2, where_prev=torch.arange(length).expand(b, length), mask=mask)
    assert torch.equal(second.where, direct.where) and torch.equal(second.mask, direct.mask)
    v = direct.plan.valid
    assert torch.equal(second.rows[v], direct.rows[v])


def test_slot_index_inverts_src():
    keep = torch.tensor([[True, False, True], [False, True, False]])
    assert slot_index(plan_compaction(keep), 3).tolist() == [[0, -1, 1], [-1, 1, -1]]


def test_recompact_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"keep \(1, 3\), where_prev \(1, 4\)"):
        recompact(torch.zeros(1, 4, 2), torch.ones(1, 3, dtype=torch.bool), where_prev=torch.arange(4)[None],
                  mask=torch.ones(1, 3, dtype=torch.bool))
