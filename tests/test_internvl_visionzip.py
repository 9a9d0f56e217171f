"""VisionZip and `pool` per tile on InternVL (tiles, thumbnail last, pixel shuffle): identity, exact counts on a
left-padded batch of different tile counts, the selection against the ops function fed with hand-built
post-shuffle tensors, the rows the LLM receives against hand-merged / hand-pooled projector inputs put through
the projector (forward and greedy generate through `inputs_embeds`), eager vs sdpa, `remove()`, bf16."""

import copy

import pytest
import torch

import vlmdrop
from vlmdrop.ops.budget import resolve_budget
from vlmdrop.ops.visionzip import split_budget, visionzip_select
from vlmdrop.zoo.tiny import tiny_internvl

from conftest import batch, get_model
from test_visionzip import reference_embeds

PROMPT = "USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:"
# tiny InternVL: 64 px tiles, 8x8 patches -> pixel shuffle 0.5 -> 4x4 = 16 tokens per tile, max_patches=6
ONE, THREE, MAX = (56, 56), (60, 130), (50, 300)  # 1 tile (no thumbnail); 2x1 + thumbnail; 1x6 + thumbnail
MIXED = [THREE, ONE, MAX]  # 3, 1, 7 tiles: left padding
SIZES = [ONE, THREE, (90, 50), MAX, (200, 100), (130, 120)]
TILES = [1, 3, 3, 7, 3, 5]
PER_TILE, SIDE, PATCH_SIDE = 16, 4, 8
METHODS = ["visionzip", "pool"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids oversubscription on shared CI cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _inputs(proc, sizes=MIXED):
    return batch(proc, sizes, prompts=[PROMPT] * len(sizes))


def _tile_starts(tiles: list[int]) -> list[int]:
    starts = [0]
    for n in tiles:
        starts.append(starts[-1] + n)
    return starts


def post_shuffle_tensors(model, pixel_values):
    """Without vlmdrop: per tile, the projector's input in LLM-position order (T, 16, 4C), and on the 4x4
    post-shuffle raster grid the feature layer's CLS attention summed over each token's 2x2 source patches
    (T, H, 16) (eager attention probabilities; None under sdpa) and its keys averaged over heads, then over
    the 2x2 sources (T, 16, Dh) (a hook on k_proj)."""
    vt = model.model.vision_tower
    attn = vt.encoder.layer[-1].attention  # tiny config: vision_feature_layer = -1
    seen = {}
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out.detach()))
    try:
        with torch.no_grad():
            out = vt(pixel_values=pixel_values, output_attentions=True)
    finally:
        hook.remove()
    t = pixel_values.shape[0]
    feats = out.last_hidden_state[:, 1:]  # (T, 64, C)
    with torch.no_grad():
        pre = model.model.pixel_shuffle(feats.reshape(t, PATCH_SIDE, PATCH_SIDE, -1), scale_factor=0.5)
    pre = pre.reshape(t, PER_TILE, -1)  # (T, 16, 4C) what the projector receives, in placeholder order
    heads = attn.num_heads
    cls = None  # attention probabilities come back under eager attention only
    if out.attentions:
        cls = out.attentions[-1][:, :, 0, 1:]  # (T, H, 64) CLS row, CLS column dropped
        cls = cls.reshape(t, heads, SIDE, 2, SIDE, 2).sum((3, 5)).reshape(t, heads, PER_TILE)  # (T, H, 16)
    k = seen["k"][:, 1:]  # (T, 64, H*Dh)
    k = k.reshape(t, 64, heads, -1).mean(2)  # (T, 64, Dh)
    k = k.reshape(t, SIDE, 2, SIDE, 2, -1).mean((2, 4)).reshape(t, PER_TILE, -1)  # (T, 16, Dh)
    return pre, cls, k


def captured_rows(model):
    """A pre-hook that, registered after vlmdrop's, sees the rows handed to the LLM ((1, n_kept_total, D))."""
    seen = {}

    def hook(m, a, k):
        mm = k.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            seen["rows"] = mm["image"].pooler_output.detach().clone()
            seen["input_ids"] = k["input_ids"].clone()
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def new_row(method: str, pre: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """VisionZip: target + mean of the tokens merged into it; pool: the mean of the region."""
    if method == "pool":
        return pre[group].mean(0)
    t = pre[group[0]]
    return t + pre[group[1:]].mean(0) if group.numel() > 1 else t


def expected_rows(model, inputs, stats):
    """Per image: the unmodified rows at `kept_indices`, then the hand-built new rows through the projector."""
    pv = inputs["pixel_values"]
    pre, _, _ = post_shuffle_tensors(model, pv)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output  # (T, 16, D)
        torch.testing.assert_close(model.model.multi_modal_projector(pre), feats)  # pre is the projector's input
    starts = _tile_starts([s.n_before // PER_TILE for s in stats.images])
    out = []
    for i, s in enumerate(stats.images):
        f = feats[starts[i]:starts[i + 1]].reshape(-1, feats.shape[-1])  # (n_before, D)
        p = pre[starts[i]:starts[i + 1]].reshape(s.n_before, -1)  # (n_before, 4C)
        rows = f[s.kept_indices]
        if s.n_new:
            with torch.no_grad():
                made = torch.stack([new_row(s.method, p, g) for g in s.new_groups])  # (n_new, 4C)
                rows = torch.cat([rows, model.model.multi_modal_projector(made)])
        out.append(rows)
    return out


def test_pixel_shuffle_geometry_of_tiny_model():
    """The assumption the hand-built references rest on: post-shuffle token p (placeholder order) sits at
    raster (p // 4, p % 4) and concatenates the patches (2i + a, 2j + b), a, b in {0, 1}."""
    model, _ = get_model("internvl")
    idx = torch.arange(64, dtype=torch.float64).reshape(1, PATCH_SIDE, PATCH_SIDE, 1)
    src = model.model.pixel_shuffle(idx, scale_factor=0.5).reshape(PER_TILE, 4).long()  # (16, 4)
    for p in range(PER_TILE):
        i, j = divmod(p, SIDE)
        assert sorted(src[p].tolist()) == sorted((2 * i + a) * PATCH_SIDE + 2 * j + b for a in (0, 1) for b in (0, 1))


@pytest.mark.parametrize("budget", [1.0, 10_000])
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identity(method, budget):
    model, proc = get_model("internvl")
    inputs = _inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmdrop.dropping(model, method, budget=budget) as h:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    assert [s.n_before for s in h.stats.images] == [3 * PER_TILE, PER_TILE, 7 * PER_TILE]
    assert all(s.n_kept == s.n_before and s.n_new == 0 and s.new_groups is None for s in h.stats.images)


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.77, 7])
@pytest.mark.parametrize("method", METHODS)
def test_exact_counts_per_tile(method, budget):
    model, proc = get_model("internvl")
    inputs = _inputs(proc, SIZES)
    assert int(inputs["attention_mask"].sum(1).min()) < inputs["input_ids"].shape[1]  # left padding
    with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget) as h:
        seen, hook = captured_rows(model)
        try:
            model(**inputs)
        finally:
            hook.remove()
    image_id = model.config.image_token_id
    assert seen["rows"].shape[:2] == (1, sum(s.n_kept for s in h.stats.images))
    for b, (s, n_tiles) in enumerate(zip(h.stats.images, TILES)):
        assert s.sample == b and s.n_before == n_tiles * PER_TILE
        assert s.n_kept == resolve_budget(budget, s.n_before) == s.kept_indices.numel() + s.n_new
        assert int((seen["input_ids"][b] == image_id).sum()) == s.n_kept
        assert len(s.crop_budgets) == n_tiles and s.crop_budgets == s.crop_kept and sum(s.crop_budgets) == s.n_kept
        assert max(s.crop_budgets) - min(s.crop_budgets) <= 1  # equal tiles: shares differ by one at most
        k = s.kept_indices
        assert torch.all(k[1:] > k[:-1])
        groups = s.new_groups or []
        assert len(groups) == s.n_new
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
    pre, cls, keys = post_shuffle_tensors(model, inputs["pixel_values"])
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


@pytest.mark.parametrize("method,params", [("visionzip", {"budget": 0.4}), ("visionzip", {"budget": 9}),
                                           ("visionzip", {"budget": 0.5, "ratio": 1.0}), ("pool", {"budget": 0.3})])
def test_forward_equals_reference(method, params):
    model, proc = get_model("internvl")
    inputs = _inputs(proc)
    pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), vlmdrop.dropping(model, method, **params) as h:
        seen, hook = captured_rows(model)
        try:
            out = model(**inputs, position_ids=pos).logits
        finally:
            hook.remove()
    expected = expected_rows(model, inputs, h.stats)
    assert any(s.n_new for s in h.stats.images)
    torch.testing.assert_close(seen["rows"][0], torch.cat(expected), atol=1e-5, rtol=1e-5)
    for b, rows in enumerate(expected):
        with torch.no_grad():
            ref = model(inputs_embeds=reference_embeds(model, inputs, b, rows)).logits[0]
        torch.testing.assert_close(out[b, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_reference(method):
    model, proc = get_model("internvl")
    inputs = _inputs(proc)
    n_new = 5
    with torch.no_grad():
        with vlmdrop.dropping(model, method, budget=0.3) as h:
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        L = inputs["input_ids"].shape[1]
        assert torch.equal(out[:, :L], inputs["input_ids"])
        for b, rows in enumerate(expected_rows(model, inputs, h.stats)):
            emb = reference_embeds(model, inputs, b, rows)
            ref = model.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                 max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            assert out[b, L:].tolist() == ref[0, -n_new:].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_same_tokens(method):
    got, inputs = {}, None
    for attn in ("sdpa", "eager"):
        model, proc = tiny_internvl(attn_implementation=attn)  # fresh: other tests round-trip shared weights
        inputs = inputs or _inputs(proc)
        with torch.no_grad(), vlmdrop.dropping(model, method, budget=0.3) as h:
            model.generate(**inputs, max_new_tokens=2)
        got[attn] = [(s.kept_indices.tolist(), [g.tolist() for g in s.new_groups]) for s in h.stats.images]
    assert got["sdpa"] == got["eager"]


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_model_exactly(method):
    model, proc = get_model("internvl")
    inputs = _inputs(proc)
    counts = lambda: {n: (len(m._forward_hooks), len(m._forward_pre_hooks), type(m))  # noqa: E731
                      for n, m in model.named_modules()}
    before, cls_before = counts(), type(model.model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h = vlmdrop.apply(model, method, budget=0.2)
        assert counts() != before
        model.generate(**inputs, max_new_tokens=4)
        assert all(s.n_kept == resolve_budget(0.2, s.n_before) for s in h.stats.images)
        h.remove()
        h.remove()
        assert counts() == before
        assert type(model.model) is cls_before and "_vlmdrop_sink" not in model.model.__dict__
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


def test_bf16_runs():
    shared, proc = get_model("internvl")
    model = copy.deepcopy(shared).to(torch.bfloat16)  # a copy: a bf16 round trip would change the shared weights
    inputs = _inputs(proc)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    for method in METHODS:
        with torch.no_grad(), vlmdrop.dropping(model, method, budget=0.3) as h:
            out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        assert [s.n_kept for s in h.stats.images] == [resolve_budget(0.3, s.n_before) for s in h.stats.images]
