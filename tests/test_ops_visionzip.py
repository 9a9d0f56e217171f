import pytest
import torch

from vlmdrop.ops.visionzip import split_budget, visionzip_select


def _case():
    # per-head CLS attention, summed: [0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.4, 0.0] -> dominant {1, 3}
    total = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.4, 0.0])
    cls_attn = torch.stack([total * 0.25, total * 0.75])  # (2, 8)
    keys = torch.tensor(
        [[1.0, 0.0], [5.0, 5.0], [2.0, 0.1], [5.0, 5.0], [0.1, 3.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]
    )  # (8, 2)
    hidden = torch.arange(8, dtype=torch.float32).unsqueeze(1) * 10  # (8, 1): token i -> 10*i
    return cls_attn, keys, hidden


def test_hand_computed_merge():
    cls_attn, keys, hidden = _case()
    r = visionzip_select(cls_attn, keys, hidden, dominant=2, contextual=2)
    assert r.dominant_idx.tolist() == [1, 3]
    # rest = [0, 2, 4, 5, 6, 7], step = 6 // 2 = 3 -> targets rest[0], rest[3] = patches 0, 5
    assert r.target_idx.tolist() == [0, 5]
    # 2 -> 0, 4 -> 5, 6 = (1, 1) ties -> first target 0, 7 -> 5
    assert [g.tolist() for g in r.groups] == [[0, 2, 6], [5, 4, 7]]
    # target + mean of its group: 0 + (20 + 60) / 2 = 40 ; 50 + (40 + 70) / 2 = 105
    assert r.contextual_tokens.squeeze(1).tolist() == [40.0, 105.0]


def test_keys_averaged_over_heads():
    cls_attn, keys, hidden = _case()
    per_head = torch.stack([2 * keys, torch.zeros_like(keys)])  # (2, 8, 2), head mean == keys
    a = visionzip_select(cls_attn, keys, hidden, dominant=2, contextual=2)
    b = visionzip_select(cls_attn, per_head, hidden, dominant=2, contextual=2)
    assert torch.equal(a.contextual_tokens, b.contextual_tokens)


def test_contextual_zero_is_plain_topk():
    cls_attn, keys, hidden = _case()
    r = visionzip_select(cls_attn.sum(0), keys, hidden, dominant=3, contextual=0)
    assert r.dominant_idx.tolist() == [1, 3, 6]
    assert r.contextual_tokens.shape == (0, 1) and r.target_idx.numel() == 0 and r.groups == []


def test_all_targets_no_merge_is_identity():
    cls_attn, keys, hidden = _case()
    r = visionzip_select(cls_attn, keys, hidden, dominant=0, contextual=8)
    assert r.dominant_idx.numel() == 0
    assert r.target_idx.tolist() == list(range(8))
    assert torch.equal(r.contextual_tokens, hidden)


def test_step_rule_truncates_targets():
    # n_rest = 7, contextual = 3 -> step 2 -> arange(0, 7, 2) = [0, 2, 4, 6][:3] = [0, 2, 4]
    hidden = torch.arange(7, dtype=torch.float32).unsqueeze(1)
    keys = torch.randn(7, 4)
    r = visionzip_select(torch.zeros(7), keys, hidden, dominant=0, contextual=3)
    assert r.target_idx.tolist() == [0, 2, 4]
    assert sorted(torch.cat(r.groups).tolist()) == list(range(7))


def test_errors_carry_values():
    cls_attn, keys, hidden = _case()
    with pytest.raises(ValueError, match="dominant=6, contextual=3"):
        visionzip_select(cls_attn, keys, hidden, dominant=6, contextual=3)
    with pytest.raises(ValueError, match="keys 7"):
        visionzip_select(cls_attn, keys[:7], hidden, dominant=2, contextual=2)
    with pytest.raises(ValueError, match=r"\(1, 2, 8\)"):
        visionzip_select(cls_attn.unsqueeze(0), keys, hidden, dominant=2, contextual=2)


def test_split_budget_paper_ratios():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)
    assert split_budget(0) == (0, 0)
    assert split_budget(10, ratio=1.0) == (5, 5)
    with pytest.raises(ValueError, match="-1"):
        split_budget(-1)
    with pytest.raises(ValueError, match="ratio must be > 0, got 0"):
        split_budget(64, ratio=0)
