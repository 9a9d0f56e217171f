"""Qwen2.5-VL and Qwen3-VL specifics (the shared properties run in `test_properties.py`): the 2x2 source map
against the model's own window permutation and merger, the received-attention scores against the eager
attention, the M-RoPE positions of the kept tokens against the unmodified model's, decode steps without
positions, DeepStack at the kept rows, and the refusals (videos, positions="compact")."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import get_model, make_image
from references import image_refs, qwen_sample_reference

import vlmdrop
from vlmdrop.adapters import adapter_for
from vlmdrop.adapters.hf_vlm import ENCODED_ATTR
from vlmdrop.testing import QWEN_IMAGE

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
PROMPT = f"USER: {QWEN_IMAGE}\nwhat is the shape ? ASSISTANT:"
TWO = f"USER: what is this ? {QWEN_IMAGE}\nand {QWEN_IMAGE}\nthe colour ? ASSISTANT:"
SIZES = [(60, 130), (90, 50), (40, 70)]  # LLM grids 4x8, 6x3, 2x4


def _inputs(proc, sizes=SIZES, prompts=(TWO, PROMPT)):
    images = [make_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    return proc(images=images, text=list(prompts), return_tensors="pt", padding=True)


def _windowed_model(attn: str = "sdpa"):
    """Qwen2.5-VL configured unlike the grid's: 3x3-token windows (uneven at the borders), full attention in
    blocks 1 and 3 of 5 (block 0 and the last block attend within windows)."""
    return get_model("qwen2_5_vl", attn, window_size=48, fullatt_block_indexes=(1, 3), vision_layers=5)


def _source_rows(model, inputs) -> list[torch.Tensor]:
    """Per image, (n, 4): the ViT block rows each LLM token's merger output is made of, as the model itself
    orders them -- its last block's output replaced by the row ids, its merger by 'the ids of my 4 inputs',
    everything else (window permutation, un-permutation, split per image) the model's own code."""
    visual = model.model.visual
    d_out = model.config.vision_config.out_hidden_size

    def ids_out(module, args, out):
        return torch.arange(out.shape[0], dtype=out.dtype)[:, None].expand_as(out).clone()

    def merge_ids(module, args, out):
        ids = args[0][:, 0].reshape(-1, 4)  # (S/4, 4) the rows merged into each output row
        return torch.cat([ids, ids.new_zeros(ids.shape[0], d_out - 4)], dim=1)

    hooks = [visual.blocks[-1].register_forward_hook(ids_out), visual.merger.register_forward_hook(merge_ids)]
    try:
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    finally:
        for h in hooks:
            h.remove()
    return [p[:, :4].round().long() for p in out.pooler_output]


@pytest.mark.parametrize("which", ["qwen2_5_vl", "qwen3_vl", "windowed"])
def test_source_map_matches_the_models_merger(which):
    model, proc = _windowed_model() if which == "windowed" else get_model(which)
    inputs = _inputs(proc)
    adapter = adapter_for(model)
    grid = inputs["image_grid_thw"]
    tok = adapter.row_tokens(grid)  # (S,) LLM token of each ViT row
    sources = _source_rows(model, inputs)
    start = 0
    for src in sources:  # token m of image i is made of rows src[m]
        n = src.shape[0]
        expect = torch.arange(start, start + n)[:, None].expand(-1, 4)
        assert torch.equal(tok[src], expect)
        start += n
    assert start == tok.numel() // 4
    if which != "qwen3_vl":  # the window permutation matters: the processor's block order is not the row order
        assert not torch.equal(tok, torch.arange(tok.numel()) // 4)


def _eager_received(model, inputs, block: int) -> torch.Tensor:
    """(H, S) the attention each row receives in ViT block `block`, mean over the queries of its segment,
    from the eager attention's own probabilities (its module-level `eager_attention_forward`, wrapped)."""
    mod = sys.modules[type(model.model.visual).__module__]
    orig, seen = mod.eager_attention_forward, []
    target = model.model.visual.blocks[block].attn

    def spy(module, *args, **kwargs):
        out, w = orig(module, *args, **kwargs)
        if module is target:
            seen.append(w[0].float().mean(dim=1))  # (H, n) mean over queries
        return out, w

    mod.eager_attention_forward = spy
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    finally:
        mod.eager_attention_forward = orig
    return torch.cat(seen, dim=1)


@pytest.mark.parametrize("which", ["qwen2_5_vl", "qwen3_vl", "windowed"])
def test_scores_are_the_attention_received_at_a_full_attention_block(which):
    model, proc = _windowed_model("eager") if which == "windowed" else get_model(which, "eager")
    inputs = _inputs(proc)
    adapter = adapter_for(model)
    full = adapter.full_attention_blocks()
    with vlmdrop.dropping(model, "hired", budget=0.3, first_layer=0):
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        images = [getattr(f, ENCODED_ATTR) for f in out.pooler_output]
    tok = adapter.row_tokens(inputs["image_grid_thw"])
    first_block = full[0]  # block 0 attends within windows on Qwen2.5-VL: scored at the first full block
    assert adapter.score_block(0) == first_block
    last = len(model.model.visual.blocks) - 1
    feature_block = adapter.score_block(last)  # the last block, or (windowed) the last full block before it
    assert feature_block == (full[-1] if which == "windowed" else last)
    for role, block in (("first", first_block), ("feature", feature_block)):
        assert block in full
        received = _eager_received(model, inputs, block)  # (H, S)
        pooled = torch.zeros(received.shape[0], int(tok.max()) + 1).index_add_(1, tok, received)  # (H, N)
        start = 0
        for im in images:
            got = im.cls_attn[role][0]  # (H, n)
            torch.testing.assert_close(got, pooled[:, start:start + im.n_before], atol=1e-5, rtol=1e-4)
            start += im.n_before
    if which != "qwen3_vl":  # a window block's scores would differ: the mapping to a full block matters
        assert 0 not in full
        windowed = _eager_received(model, inputs, 0)
        assert not torch.allclose(windowed, _eager_received(model, inputs, first_block), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,params", [("hired", {"budget": 0.3}), ("pool", {"budget": 0.3}),
                                           ("visionzip", {"budget": 9, "ratio": 1.0})])
def test_kept_tokens_keep_the_unmodified_models_mrope_positions(family, method, params):
    model, proc = get_model(family)
    inputs = _inputs(proc)
    lm = model.model.language_model
    with torch.no_grad():
        full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])  # (3, B, L)
    seen = []
    with torch.no_grad(), vlmdrop.dropping(model, method, **params) as h:
        hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
        try:
            model(**inputs)
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        finally:
            hook.remove()
    image_id = model.config.image_token_id
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    stats = h.stats.images
    for call, kw in ((0, seen[0]), (1, seen[1])):  # model(**inputs); generate's prefill ((4, B, L): text row first)
        pos = kw["position_ids"]
        pos = pos[1:] if pos.shape[0] == 4 else pos
        got_mask = kw["attention_mask"].bool()
        for b in range(ids.shape[0]):
            cols = mask[b].nonzero(as_tuple=True)[0]
            ph = cols[ids[b, cols] == image_id]
            keep_cols, src = [], {}
            off = 0
            for s in [s for s in stats if s.sample == b]:
                n = s.n_before
                own = ph[off:off + n]
                reps = [int(g[0]) for g in (s.new_groups or [])]
                kept = own[s.kept_indices].tolist() + [int(own[r]) for r in reps]
                slots = own[: len(kept)].tolist() if s.n_new else kept
                src.update(dict(zip(slots, kept)))
                keep_cols += slots
                off += n
            wanted = [int(c) for c in cols if int(ids[b, c]) != image_id or int(c) in set(keep_cols)]
            expect = full[:, b, [src.get(c, c) for c in wanted]]  # (3, n_b) the unmodified model's positions
            assert torch.equal(pos[:, b][:, got_mask[b]], expect), (call, b)
    # decode steps: generate's positions, one past the prompt's largest, as the unmodified model
    for t, kw in enumerate(seen[2:]):
        pos = kw["position_ids"]
        expect = full.amax(dim=(0, 2)) + 1 + t  # (B,)
        assert torch.equal(pos[1:, :, 0], expect[None].expand(3, -1)), t


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decode_loop_without_positions_equals_reference(family):
    """A vision-stage drop, then cached steps called with the caller's full mask and no position_ids: vlmdrop
    gives them the unmodified model's positions (the model's `rope_deltas` rule, one past the prompt)."""
    model, proc = get_model(family)
    inputs = _inputs(proc)
    mask = inputs["attention_mask"]
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3) as h:
        out = model(**inputs, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     cache=out.cache).logits[:, -1]
        stats = list(h.stats.images)
    images = image_refs(model, inputs)
    for b in range(mask.shape[0]):
        ref = qwen_sample_reference(model, inputs, b, images, stats, n_new=1, next_token=int(nxt[b]))
        torch.testing.assert_close(step[b], ref.step_logits, atol=1e-4, rtol=1e-4)


def test_deepstack_rows_follow_the_kept_rows():
    """Qwen3-VL: the reference that gathers the DeepStack rows at the kept rows matches; one that hands the
    language model no DeepStack rows does not (so the test can fail)."""
    model, proc = get_model("qwen3_vl")
    inputs = _inputs(proc)
    with torch.no_grad(), vlmdrop.dropping(model, "random", budget=0.5, seed=1) as h:
        logits = model(**inputs).logits
    images = image_refs(model, inputs)
    assert all(len(im.deepstack) == 2 for im in images)  # DeepStack layers of the tiny model
    stats = list(h.stats.images)
    for b in range(logits.shape[0]):
        ref = qwen_sample_reference(model, inputs, b, images, stats, n_new=1)
        n = ref.logits.shape[0]
        torch.testing.assert_close(logits[b, -n:], ref.logits, atol=1e-4, rtol=1e-4)
    for im in images:
        im.deepstack = []
    ref = qwen_sample_reference(model, inputs, 0, images, stats, n_new=1)
    assert not torch.allclose(logits[0, -ref.logits.shape[0]:], ref.logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_stage_compact_positions_are_refused(family):
    model, _ = get_model(family)
    with pytest.raises(ValueError, match="positions='compact'.*M-RoPE"):
        vlmdrop.apply(model, "fastv", layer=2, keep=0.5, positions="compact")
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_video_inputs_are_refused(family):
    model, proc = get_model(family)
    inputs = _inputs(proc)
    video = torch.zeros(4 * 4, inputs["pixel_values"].shape[1])  # one 2-frame 32x32 clip: 16 patches
    with vlmdrop.dropping(model, "hired", budget=0.5), pytest.raises(ValueError, match="video"):
        model(**inputs, pixel_values_videos=video, video_grid_thw=torch.tensor([[1, 4, 4]]))


def test_hired_on_a_single_crop_spends_the_whole_budget_on_its_top_tokens():
    model, proc = get_model("qwen2_5_vl")
    inputs = _inputs(proc)
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3, alpha=0.9) as h:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        model(**inputs)
    for s, feat in zip(h.stats.images, out.pooler_output):
        im = getattr(feat, ENCODED_ATTR)
        k = round(0.3 * s.n_before)
        assert s.crop_budgets == [k] and s.n_kept == k  # alpha has no sub-images to act on
        top = torch.topk(im.cls_attn["feature"][0].sum(0), k).indices.sort().values
        assert torch.equal(s.kept_indices, top)


@pytest.mark.parametrize("method,params", [("hired", {"budget": 0.3}), ("visionzip", {"budget": 9, "ratio": 1.0}),
                                           ("pool", {"budget": 0.3}), ("random", {"budget": 7, "seed": 2}),
                                           ("globalcom2", {"budget": 0.25})])
def test_qwen3_5_vision_stage(method, params):
    """Qwen3.5 (Qwen3-VL's vision path, hybrid linear-attention LLM): identity at budget 1.0, exact counts, the
    hand-built reference (kept rows at their original M-RoPE positions), generate, a clean removal."""
    model, proc = get_model("qwen3_5")
    inputs = _inputs(proc)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with vlmdrop.dropping(model, method, **{**params, "budget": 1.0}):
            assert torch.equal(model(**inputs).logits, ref_logits)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False), ref_gen)
        with vlmdrop.dropping(model, method, **params) as h:
            logits = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        images = image_refs(model, inputs)
        stats = list(h.stats.images)
        for s, im in zip(stats, images):
            b = params["budget"]
            n = im.rows.shape[0]
            assert s.n_before == n and s.n_kept == (max(1, round(b * n)) if isinstance(b, float) else min(b, n))
        for b in range(logits.shape[0]):
            ref = qwen_sample_reference(model, inputs, b, images, stats, n_new=3)
            n = ref.logits.shape[0]
            torch.testing.assert_close(logits[b, -n:], ref.logits, atol=1e-4, rtol=1e-4)
            assert gen[b, inputs["input_ids"].shape[1]:].tolist() == ref.tokens
        assert torch.equal(model(**inputs).logits, ref_logits)  # removed


def test_qwen3_5_refuses_llm_stage_methods():
    model, _ = get_model("qwen3_5")
    with pytest.raises(ValueError, match="does not support LLM-stage methods"):
        vlmdrop.apply(model, "fastv", layer=2, keep=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_beams_follows_the_expanded_images(family):
    """`generate(num_beams=2, num_return_sequences=2)` repeats the encoded images (and DeepStack rows) per beam:
    identity at budget 1.0, and each copy of an image keeps its exact count."""
    model, proc = get_model(family)
    inputs = _inputs(proc)
    kw = {"max_new_tokens": 3, "num_beams": 2, "num_return_sequences": 2, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with vlmdrop.dropping(model, "visionzip", budget=1.0):
            assert torch.equal(model.generate(**inputs, **kw), ref)
        with vlmdrop.dropping(model, ["hired", "fastv"], hired={"budget": 0.3}, fastv={"keep": 0.5}) as h:
            out = model.generate(**inputs, **kw)
    assert out.shape[0] == 4
    n = [im.rows.shape[0] for im in image_refs(model, inputs)]  # 32, 18 (row 0), 8 (row 1)
    expect = [round(0.5 * round(0.3 * k)) for k in (n[0], n[1], n[0], n[1], n[2], n[2])]
    assert [s.n_kept for s in h.stats.images] == [max(1, e) for e in expect]


@pytest.mark.parametrize("family", FAMILIES)
def test_score_option_cls_is_refused_received_is_the_default(family):
    """Issue 15's `score` option: the Qwen ViTs have no CLS token, so "auto" is "received" and "cls" raises."""
    model, proc = get_model(family)
    inputs = _inputs(proc)
    with pytest.raises(ValueError, match="score='cls'.*no CLS token"):
        vlmdrop.apply(model, "hired", budget=0.3, score="cls")
    assert not model._forward_pre_hooks
    with torch.no_grad():
        stats = []
        for score in ("auto", "received"):
            with vlmdrop.dropping(model, "visionzip", budget=9, score=score) as h:
                model(**inputs)
            stats.append([s.kept_indices.tolist() for s in h.stats.images])
    assert stats[0] == stats[1]
