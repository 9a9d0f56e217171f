"""The core engine on the real transformers classes: identity, exact budgets, equality with a
hand-built reference (forward and generate, left-padded batches), backends, dtypes, reversibility."""

import pytest
import torch

import vlmdrop
from vlmdrop.ops.budget import resolve_budget

from conftest import IMAGE_SIZES, PROMPTS, batch, get_model

MIXED = [(60, 130), (90, 50), (56, 56)]  # grids 1x3, 2x1, 1x2 -> different lengths, left padding


def _enc_features(model, inputs):
    """Unmodified visual rows per image, as the untouched model computes them."""
    kw = {"pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:
        kw["image_sizes"] = inputs["image_sizes"]
    with torch.no_grad():
        return list(model.model.get_image_features(**kw, return_dict=True).pooler_output)


def _reference_embeds(model, inputs, stats, b):
    """Sample b alone, unpadded: its text, with only the kept placeholders, holding the kept rows."""
    feats = _enc_features(model, inputs)
    image_id = model.config.image_token_id
    row = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
    img = [i for i, s in enumerate(stats.images) if s.sample == b]
    assert len(img) == 1
    st = stats.images[img[0]]
    ph = (row == image_id).nonzero(as_tuple=True)[0]
    assert ph.numel() == st.n_before
    drop = torch.ones(row.numel(), dtype=torch.bool)
    drop[ph] = False
    drop[ph[st.kept_indices]] = True
    ids = row[drop]
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)[None].clone()  # (1, L_b, D)
        emb[0, ids == image_id] = feats[img[0]][st.kept_indices].to(emb.dtype)
    return emb


def _cumsum_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("method", ["hired", "random"])
def test_full_budget_is_identity(kind, method):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmdrop.dropping(model, method, budget=1.0) as h:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    assert [s.n_kept for s in h.stats.images] == [s.n_before for s in h.stats.images]


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5, 0.77, 1.0, 7, 10_000])
@pytest.mark.parametrize("method", ["hired", "random"])
def test_exact_kept_counts(kind, method, budget):
    model, proc = get_model(kind)
    sizes = IMAGE_SIZES if kind == "llava_next" else IMAGE_SIZES[:3]
    inputs = batch(proc, sizes)
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget) as h:
            model(**inputs)
    finally:
        hook.remove()
    assert len(h.stats.images) == len(sizes)
    removed = []
    for b, s in enumerate(h.stats.images):
        assert s.sample == b
        assert s.n_kept == resolve_budget(budget, s.n_before)
        k = s.kept_indices
        assert k.dtype == torch.long and k.numel() == s.n_kept
        assert torch.all(k[1:] > k[:-1]) and int(k.min()) >= 0 and int(k.max()) < s.n_before
        assert sum(s.crop_budgets) == sum(s.crop_kept) <= s.n_kept
        assert s.crop_budgets == s.crop_kept
        removed.append(s.n_before - s.n_kept)
    # the LLM gets a shorter sequence with contiguous positions
    emb, pos = seen["inputs_embeds"], seen.get("position_ids")
    L = inputs["input_ids"].shape[1]
    assert emb.shape[1] == L - min(removed)
    if min(removed) > 0:
        mask = seen["attention_mask"]
        for b in range(len(sizes)):
            valid = mask[b].bool()
            assert int(valid.sum()) == int(inputs["attention_mask"][b].sum()) - removed[b]
            p = pos[b][valid]
            assert torch.all(p[1:] - p[:-1] == 1), p  # no gaps where rows were removed


def test_crop_budget_caps_llava_next():
    model, proc = get_model("llava_next")
    inputs = batch(proc, [(40, 170)])  # 1x3 grid, heavily unpadded
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.9) as h:
        model(**inputs)
    s = h.stats.images[0]
    assert len(s.crop_budgets) == 4
    hw = 16
    assert s.crop_budgets[0] <= hw and sum(s.crop_budgets) <= s.n_kept


@pytest.mark.parametrize("method,params", [("hired", {"budget": 0.3}), ("random", {"budget": 9, "seed": 3}),
                                           ("hired", {"budget": 0.5, "alpha": 0.2})])
def test_forward_equals_reference(kind, method, params):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    pos = _cumsum_positions(inputs["attention_mask"])
    with torch.no_grad():
        with vlmdrop.dropping(model, method, **params) as h:
            out = model(**inputs, position_ids=pos).logits
        for b in range(len(MIXED)):
            emb = _reference_embeds(model, inputs, h.stats, b)
            ref = model(inputs_embeds=emb).logits[0]
            got = out[b, -ref.shape[0]:]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["hired", "random"])
def test_generate_equals_reference(kind, method):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    n_new = 6
    with torch.no_grad():
        with vlmdrop.dropping(model, method, budget=0.25) as h:
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        L = inputs["input_ids"].shape[1]
        assert torch.equal(out[:, :L], inputs["input_ids"])
        for b in range(len(MIXED)):
            emb = _reference_embeds(model, inputs, h.stats, b)
            ref = model.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                 max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            assert out[b, L:].tolist() == ref[0, -n_new:].tolist()


def test_manual_decode_loop_uses_compacted_cache(kind):
    """model(**inputs) then model(next_token, cache=...) — the post-hook keys the state to the cache."""
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED[:2])
    with torch.no_grad():
        with vlmdrop.dropping(model, "hired", budget=0.2) as h:
            pos = _cumsum_positions(inputs["attention_mask"])
            out = model(**inputs, position_ids=pos)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
            step = model(input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + 1, cache=out.cache)
        for b in range(2):
            emb = _reference_embeds(model, inputs, h.stats, b)
            emb = torch.cat([emb, model.get_input_embeddings()(nxt[b:b + 1])], dim=1)
            ref = model(inputs_embeds=emb).logits[0, -1]
            torch.testing.assert_close(step.logits[b, -1], ref, atol=1e-4, rtol=1e-4)


def test_sampling_generate_runs_and_is_seeded(kind):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    outs = []
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2):
        for _ in range(2):
            torch.manual_seed(123)
            outs.append(model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=20))
    assert outs[0].shape == (len(MIXED), inputs["input_ids"].shape[1] + 5)
    assert torch.equal(outs[0], outs[1])


def test_eager_and_sdpa_keep_same_tokens(kind):
    m_sdpa, proc = get_model(kind, "sdpa")
    m_eager, _ = get_model(kind, "eager")
    assert m_eager.config.vision_config._attn_implementation == "eager"
    inputs = batch(proc, MIXED)
    kept = {}
    for name, m in [("sdpa", m_sdpa), ("eager", m_eager)]:
        with torch.no_grad(), vlmdrop.dropping(m, "hired", budget=0.3) as h:
            m.generate(**inputs, max_new_tokens=2)
        kept[name] = [s.kept_indices.tolist() for s in h.stats.images]
    assert kept["sdpa"] == kept["eager"]


def test_bf16(kind):
    model, proc = get_model(kind)
    model = model.to(torch.bfloat16)
    try:
        inputs = batch(proc, MIXED)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2) as h:
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert [s.n_kept for s in h.stats.images] == [resolve_budget(0.2, s.n_before) for s in h.stats.images]
    finally:
        model.to(torch.float32)


def _hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), type(m)) for name, m in model.named_modules()}


@pytest.mark.parametrize("method", ["hired", "random"])
def test_remove_restores_model_exactly(kind, method):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    before = _hook_counts(model)
    cls_before = type(model.model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h = vlmdrop.apply(model, method, budget=0.2)
        assert _hook_counts(model) != before
        model.generate(**inputs, max_new_tokens=4)
        h.remove()
        h.remove()  # idempotent
        assert _hook_counts(model) == before
        assert type(model.model) is cls_before and "_vlmdrop_sink" not in model.model.__dict__
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
    # nothing was patched at class level: a second model of the same class never drops
    other, _ = get_model(kind, "eager")
    with vlmdrop.dropping(model, method, budget=0.2):
        assert type(other.model).__name__ == type(model.model).__name__
        assert type(other.model) is not type(model.model)  # swapped on the instance only
        assert not hasattr(type(other.model), "_vlmdrop_original")


def test_from_pretrained_checkpoint(tmp_path, kind):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = get_model(kind)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    lproc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    inputs = batch(lproc, MIXED)
    with torch.no_grad(), vlmdrop.dropping(loaded, "hired", budget=0.2) as h:
        out = loaded.generate(**inputs, max_new_tokens=3)
    assert out.shape[0] == len(MIXED) and len(h.stats.images) == len(MIXED)


def test_stats_survive_decode_and_describe_prefill(kind):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2) as h:
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
        assert [s.sample for s in h.stats.images] == [0, 1, 2]
        assert all(s.n_kept < s.n_before for s in h.stats.images)


def test_two_images_in_one_prompt_and_text_only_row():
    model, proc = get_model("llava_next")
    from conftest import make_image

    imgs = [make_image(60, 130, 0), make_image(90, 50, 1)]
    prompts = ["USER: <image>\n<image>\nwhat is the shape ? ASSISTANT:", "USER: what color ? ASSISTANT:"]
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3) as h:
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert [s.sample for s in h.stats.images] == [0, 0]
    assert out.shape[0] == 2


def test_hired_official_code_mode():
    """Compatibility mode: the official code's counts (int(n_crops*N*rate), row bands, floors, no newlines)."""
    from vlmdrop.ops.hired_official import official_crop_budgets, official_total_budget

    model, proc = get_model("llava_next")
    inputs = batch(proc, [(120, 110), (90, 50)])  # grids 2x2 and 2x1: 16 base patches split into 4 | 2 bands
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.5, mode="official-code") as h:
        model.generate(**inputs, max_new_tokens=2)
    for s, n_crops in zip(h.stats.images, [5, 3]):
        assert len(s.crop_budgets) == n_crops
        total = official_total_budget(n_crops, tokens_per_crop=16, rate=0.5)
        assert s.crop_budgets[0] == min(int(total * 0.5), 16)
        assert sum(s.crop_budgets) <= total
        assert all(k <= b for k, b in zip(s.crop_kept, s.crop_budgets)) and s.n_kept == sum(s.crop_kept)
    with pytest.raises(ValueError, match="official-code"):
        vlmdrop.apply(model, "hired", budget=64, mode="official-code")
