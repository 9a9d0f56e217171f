"""`pool` on LLaVA / LLaVA-NeXT: identity, exact counts, pooled rows against a hand-built reference,
regions covering each crop, removal, bad input."""

import pytest
import torch

import vlmdrop
from vlmdrop.ops.budget import resolve_budget

from conftest import IMAGE_SIZES, batch, get_model
from test_visionzip import captured_rows, encoded, one_thread, pre_projector_rows, reference_embeds  # noqa: F401

MIXED = [(60, 130), (90, 50), (56, 56)]


def test_full_budget_is_identity(kind):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmdrop.dropping(model, "pool", budget=1.0) as h:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    assert all(s.n_kept == s.n_before and s.n_new == 0 for s in h.stats.images)


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.77, 7])
def test_exact_counts_and_regions(kind, budget):
    model, proc = get_model(kind)
    sizes = IMAGE_SIZES if kind == "llava_next" else IMAGE_SIZES[:3]
    inputs = batch(proc, sizes)
    pre, _ = pre_projector_rows(model, inputs)
    with torch.no_grad(), vlmdrop.dropping(model, "pool", budget=budget) as h:
        seen, hook = captured_rows(model)
        try:
            model(**inputs)
        finally:
            hook.remove()
    image_id = model.config.image_token_id
    for b, s in enumerate(h.stats.images):
        assert s.n_kept == resolve_budget(budget, s.n_before) == sum(s.crop_budgets)
        assert s.kept_indices.numel() == 0 and s.n_new == s.n_kept == len(s.new_groups)
        assert seen["rows"][b].shape[0] == s.n_kept
        assert int((seen["input_ids"][b] == image_id).sum()) == s.n_kept
        # regions lie on content positions (never LLaVA-NeXT's newline rows) and cover every crop with a share
        covered = torch.unique(torch.cat(s.new_groups))
        content = (pre[b].abs().sum(-1) > 0).nonzero().squeeze(1)  # newline rows are zero in `pre`
        assert set(covered.tolist()) <= set(content.tolist())
        if all(k > 0 for k in s.crop_budgets):
            assert covered.tolist() == content.tolist()


def test_regions_on_llava_grid():
    """4x4 grid to 4 cells: 2x2 quadrants in raster order."""
    model, proc = get_model("llava")
    inputs = batch(proc, MIXED[:1])
    with torch.no_grad(), vlmdrop.dropping(model, "pool", budget=4) as h:
        model(**inputs)
    groups = [g.tolist() for g in h.stats.images[0].new_groups]
    assert groups == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.parametrize("budget", [0.25, 0.6])
def test_forward_equals_reference(kind, budget):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    feats = encoded(model, inputs)
    pre, _ = pre_projector_rows(model, inputs)
    pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), vlmdrop.dropping(model, "pool", budget=budget) as h:
        seen, hook = captured_rows(model)
        try:
            out = model(**inputs, position_ids=pos).logits
        finally:
            hook.remove()
    proj = model.model.multi_modal_projector
    for b, s in enumerate(h.stats.images):
        with torch.no_grad():
            pooled = torch.stack([pre[b][g].mean(0) for g in s.new_groups])  # (n_new, C)
            rows = torch.cat([feats[b][s.kept_indices], proj(pooled)])
        torch.testing.assert_close(seen["rows"][b], rows, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            ref = model(inputs_embeds=reference_embeds(model, inputs, b, rows)).logits[0]
        torch.testing.assert_close(out[b, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)


def test_generate_and_remove():
    model, proc = get_model("llava_next")
    inputs = batch(proc, MIXED)
    before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vlmdrop.dropping(model, "pool", budget=0.2) as h:
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert [s.n_kept for s in h.stats.images] == [resolve_budget(0.2, s.n_before) for s in h.stats.images]
        assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == before
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref)


@pytest.mark.parametrize("params", [{"budget": 0.0}, {"budget": -3}, {"budget": "20%"}, {"ratio": 5.4}])
def test_bad_input(params):
    model, _ = get_model("llava")
    with pytest.raises(ValueError):
        vlmdrop.apply(model, "pool", **params)
