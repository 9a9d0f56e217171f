"""open_clip towers, what the property grid (`test_properties.py`: identity, exact counts inside the tower,
the hand-run tower from the stats, bf16, `remove()`) does not cover: the selection rules against a tower run
by hand, `kept_tokens` for custom pipelines, bad input, one method per tower, unsupported towers.  Tiny
random-weight models from `open_clip.create_model(name, pretrained=None)` with small registered configs
(conftest's `get_model("open_clip", "native")`, no download)."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from conftest import OPEN_CLIP_LAYERS as N_LAYERS  # noqa: E402
from conftest import get_model
from references import manual_tower, mha_cls_row_and_keys  # noqa: E402

import vlmdrop  # noqa: E402
from vlmdrop.adapters.open_clip import kept_tokens  # noqa: E402
from vlmdrop.ops.budget import resolve_budget  # noqa: E402
from vlmdrop.ops.visionzip import split_budget, visionzip_select  # noqa: E402


@pytest.fixture
def make():
    """make(family="open_clip") -> the cached tiny open_clip model."""
    return lambda family="open_clip": get_model(family, "native")[0]


def images(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g)


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("family", ["open_clip", "open_clip_qknorm"])
@pytest.mark.parametrize("method", ["hired", "visionzip", "random", "pool"])
@pytest.mark.parametrize("budget,layer", [(0.3, 2), (1, 1), (7, -1)])
def test_kept_tokens_shapes(make, family, method, budget, layer):
    model = make(family)
    x = images()
    with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget, layer=layer) as h:
        kt = kept_tokens(model, x)
    n_keep = resolve_budget(budget, 16)
    assert kt.tokens.shape == (3, n_keep, 32) and kt.kept_indices.shape == (3, n_keep - kt.n_new)
    assert kt.stats is h.stats and kt.n_new == h.stats.images[0].n_new
    if method == "visionzip":
        assert kt.n_new == split_budget(n_keep)[1]
    if method == "pool":
        assert kt.n_new == n_keep


def test_hired_equals_hand_run_tower(make):
    model = make()
    visual, x, layer = model.visual, images(), 2

    def choose(h, before):
        cls_row, _ = mha_cls_row_and_keys(visual.transformer.resblocks[layer - 1], before)
        top = cls_row.sum(1).topk(5, dim=-1).indices.sort(dim=-1).values  # (B, 5)
        idx = torch.cat([torch.zeros_like(top[:, :1]), top + 1], dim=1)  # CLS first
        return torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))

    with torch.no_grad():
        ref, ref_tokens = manual_tower(visual, x, layer, choose)
        with vlmdrop.dropping(model, "hired", budget=5, layer=layer) as h:
            out = model.encode_image(x)
            kt = kept_tokens(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kt.tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    assert torch.equal(kt.kept_indices, torch.stack([s.kept_indices for s in h.stats.images]))


def test_visionzip_equals_hand_run_tower(make):
    model = make()
    visual, x, layer = model.visual, images(seed=1), N_LAYERS - 1  # VisionZip's "layer -2" rule
    d, c = split_budget(9)

    def choose(h, before):
        cls_row, keys = mha_cls_row_and_keys(visual.transformer.resblocks[layer - 1], before)
        rows = []
        for b in range(h.shape[0]):
            r = visionzip_select(cls_row[b], keys[b], h[b, 1:], dominant=d, contextual=c)
            rows.append(torch.cat([h[b, :1], h[b, 1 + r.dominant_idx], r.contextual_tokens]))
        return torch.stack(rows)

    with torch.no_grad():
        ref, _ = manual_tower(visual, x, layer, choose)
        with vlmdrop.dropping(model, "visionzip", budget=9, layer=-1) as h:
            out = model.encode_image(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert all(s.n_new == c and s.kept_indices.numel() == d for s in h.stats.images)


def test_kept_tokens_without_a_method_and_custom_pipeline(make):
    model = make()
    x = images()
    with torch.no_grad():
        full = kept_tokens(model, x)
        assert full.tokens.shape == (3, 16, 32) and full.stats is None
        assert full.kept_indices[0].tolist() == list(range(16))
        with vlmdrop.dropping(model.visual, "random", budget=6, layer=1, seed=3) as h:  # the bare tower works too
            a = kept_tokens(model.visual, x)
            b = kept_tokens(model.visual, x)
    assert a.tokens.shape == (3, 6, 32) and a.n_new == 0 and b.stats is h.stats
    assert torch.equal(a.kept_indices, b.kept_indices)  # re-seeded every call
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=7, layer=2) as h:
        c = kept_tokens(model.visual, x)  # applied to the CLIP model, read through its tower
    assert c.tokens.shape == (3, 7, 32) and c.n_new == split_budget(7)[1] == 1
    assert c.kept_indices.shape == (3, 6) and c.stats is h.stats
    assert "_vlmdrop_tower_handle" not in model.visual.__dict__


@pytest.mark.parametrize("params,match", [
    ({"layer": 0}, "layer=0"), ({"layer": N_LAYERS}, "layer=4"), ({"layer": -N_LAYERS}, "layer=-4"),
    ({"layer": "2"}, "layer='2'"), ({"layer": True}, "layer=True"),
    ({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"),
    ({"layer": 2, "first_layer": 2}, "before layer=2"), ({"layer": 2, "feature_layer": 3}, "before layer=2"),
    ({"layer": 2, "bogus": 1}, "bogus"),
])
def test_bad_input(make, params, match):
    model = make()
    before = _hooks(model)
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, "hired", **params)
    assert _hooks(model) == before
    assert vlmdrop.apply(model, "hired", budget=0.5, layer=2).remove() is None  # nothing left half-applied


def test_one_method_per_tower(make):
    model = make()
    with vlmdrop.dropping(model, "hired", budget=0.5, layer=2):
        with pytest.raises(ValueError, match="already has vlmdrop method 'hired'"):
            vlmdrop.apply(model.visual, "random", budget=0.5, layer=2)
    vlmdrop.apply(model.visual, "random", budget=0.5, layer=2).remove()


def test_unsupported_towers_and_modes(make):
    with pytest.raises(ValueError, match="VisionTransformer.*ModifiedResNet"):
        vlmdrop.apply(make("open_clip_rn"), "hired", budget=0.5, layer=1)
    model = make()
    model.train()
    try:
        model.visual.patch_dropout = open_clip.transformer.PatchDropout(0.5)
        with vlmdrop.dropping(model, "hired", budget=0.5, layer=1), pytest.raises(ValueError, match="patch dropout"):
            model.encode_image(images())
    finally:
        model.visual.patch_dropout = torch.nn.Identity()
        model.eval()


def test_layer_is_not_a_llava_parameter():
    from conftest import get_model

    model, _ = get_model("llava")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['layer'\]"):
        vlmdrop.apply(model, "hired", budget=0.2, layer=2)
