"""open_clip towers: dropping inside the VisionTransformer from layer L on.  Tiny random-weight models
from `open_clip.create_model(name, pretrained=None)` with small registered configs (no download).
Identity, exact counts, equality with a hand-run tower, kept tokens for custom pipelines,
reversibility, bad input."""

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import vlmdrop  # noqa: E402
from vlmdrop.adapters.open_clip import kept_tokens  # noqa: E402
from vlmdrop.ops.budget import resolve_budget  # noqa: E402
from vlmdrop.ops.visionzip import split_budget, visionzip_select  # noqa: E402

N_LAYERS, GRID = 4, 4  # 32 px images, 8 px patches -> 4x4 = 16 patches
VISION = {"image_size": 32, "layers": N_LAYERS, "width": 32, "patch_size": 8, "head_width": 8}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
CONFIGS = {
    "vlmdrop-tiny-vit": VISION,
    "vlmdrop-tiny-vit-qknorm-avg": {**VISION, "qk_norm": True, "pool_type": "avg"},
    "vlmdrop-tiny-rn": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
}
_MODELS: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscription on shared CI cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, vision in CONFIGS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": TEXT}))
        open_clip.add_model_config(path)

    def build(name="vlmdrop-tiny-vit"):
        if name not in _MODELS:
            torch.manual_seed(0)
            _MODELS[name] = open_clip.create_model(name, pretrained=None).eval()
        return _MODELS[name]

    return build


def images(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g)


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def manual_tower(visual, x, layer, choose):
    """The tower run block by block; `choose(h, cls_row, keys)` -> (B, 1 + n_keep, C) rows for block `layer`.

    cls_row: (B, H, N) CLS attention of block layer-1 (from nn.MultiheadAttention's own weights);
    keys: (B, H, N, Dh) that block's keys; h: (B, 1 + N, C) block layer's input.
    """
    blocks = visual.transformer.resblocks
    h = visual._embeds(x)  # (B, 1 + N, C)
    for i, blk in enumerate(blocks):
        if i == layer:
            prev = blocks[layer - 1]
            inp = prev.ln_1(before)
            _, w = prev.attn(inp, inp, inp, need_weights=True, average_attn_weights=False)  # (B, H, T, T)
            c = inp.shape[-1]
            k = torch.nn.functional.linear(inp, prev.attn.in_proj_weight[c:2 * c], prev.attn.in_proj_bias[c:2 * c])
            heads = prev.attn.num_heads
            keys = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)[:, :, 1:]  # (B, H, N, Dh)
            h = choose(h, w[:, :, 0, 1:], keys)
        before = h
        h = blk(h)
    pooled, tokens = visual._pool(h)
    return pooled @ visual.proj, tokens


@pytest.mark.parametrize("method", ["hired", "visionzip", "random", "pool"])
@pytest.mark.parametrize("budget", [1.0, 10_000])
def test_full_budget_is_identity(make, method, budget):
    model = make()
    x = images()
    with torch.no_grad():
        ref = model.encode_image(x)
        with vlmdrop.dropping(model, method, budget=budget, layer=2) as h:
            out = model.encode_image(x)
    assert torch.equal(ref, out)
    assert [s.n_kept for s in h.stats.images] == [16] * 3


@pytest.mark.parametrize("name", ["vlmdrop-tiny-vit", "vlmdrop-tiny-vit-qknorm-avg"])
@pytest.mark.parametrize("method", ["hired", "visionzip", "random", "pool"])
@pytest.mark.parametrize("budget,layer", [(0.3, 2), (1, 1), (7, -1)])
def test_exact_counts_inside_the_tower(make, name, method, budget, layer):
    model = make(name)
    x = images()
    seen = []
    blocks = model.visual.transformer.resblocks
    with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget, layer=layer) as h:
        # probes registered after vlmdrop's hooks see what each block really receives
        probes = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in blocks]
        try:
            model.encode_image(x)
            kt = kept_tokens(model, x)
        finally:
            for p in probes:
                p.remove()
    n_keep = resolve_budget(budget, 16)
    lay = layer % N_LAYERS
    assert seen[:N_LAYERS] == [17] * lay + [1 + n_keep] * (N_LAYERS - lay)
    for s in h.stats.images:
        assert s.n_before == 16 and s.n_kept == n_keep == s.kept_indices.numel() + s.n_new
        assert torch.all(s.kept_indices[1:] > s.kept_indices[:-1])
        if method == "visionzip":
            assert s.n_new == split_budget(n_keep)[1]
        if method == "pool":
            assert s.n_new == n_keep and s.kept_indices.numel() == 0
    assert kt.tokens.shape == (3, n_keep, 32) and kt.kept_indices.shape == (3, n_keep - kt.n_new)


def test_hired_equals_hand_run_tower(make):
    model = make()
    visual, x, layer = model.visual, images(), 2

    def choose(h, cls_row, keys):
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

    def choose(h, cls_row, keys):
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


def test_remove_restores_tower(make):
    model = make()
    x = images()
    before = _hooks(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        h = vlmdrop.apply(model, "visionzip", budget=0.25, layer=2)
        assert _hooks(model) != before
        assert not torch.equal(model.encode_image(x), ref)
        h.remove()
        h.remove()
        assert _hooks(model) == before
        assert torch.equal(model.encode_image(x), ref)


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
        vlmdrop.apply(make("vlmdrop-tiny-rn"), "hired", budget=0.5, layer=1)
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
