"""VisionZip on LLaVA / LLaVA-NeXT: identity, exact counts (dominant + contextual), the rows the LLM
receives against a reference built from independently computed ViT tensors, generate, removal, bad input."""

import copy

import pytest
import torch

import vlmdrop
from vlmdrop.ops.budget import resolve_budget
from vlmdrop.ops.visionzip import split_budget, visionzip_select

from conftest import IMAGE_SIZES, batch, get_model

MIXED = [(60, 130), (90, 50), (56, 56)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids oversubscription on shared CI cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pre_projector_rows(model, inputs):
    """Per image: (n_before, C) pre-projector features at each LLM position (zeros on newline rows),
    computed without vlmdrop, plus the ViT tensors of the feature layer (hidden_states, per crop)."""
    vt = model.model.vision_tower
    with torch.no_grad():
        out = vt(inputs["pixel_values"].flatten(0, 1) if inputs["pixel_values"].dim() == 5 else inputs["pixel_values"],
                 output_hidden_states=True)
    hs = out.hidden_states  # len = layers + 1
    pre = hs[-2][:, 1:]  # (crops, h*w, C)
    if "image_sizes" not in inputs:
        return list(pre), hs
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    n = [image_size_to_num_patches(tuple(s.tolist()), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
         for s in inputs["image_sizes"]]
    # the processor pads pixel_values to the largest crop count; keep each image's own crops
    per_image = [pre[i * inputs["pixel_values"].shape[1]: i * inputs["pixel_values"].shape[1] + k] for i, k in enumerate(n)]
    rows = []
    for i, crops in enumerate(per_image):
        packed, _ = model.model.pack_image_features([crops], inputs["image_sizes"][i:i + 1], "default",
                                                    image_newline=torch.zeros(crops.shape[-1]))
        rows.append(packed[0])
    return rows, hs


def merged(pre: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """VisionZip's contextual token: target + mean of the tokens merged into it."""
    t = pre[group[0]]
    return t + pre[group[1:]].mean(0) if group.numel() > 1 else t


def captured_rows(model):
    """A pre-hook that, registered after vlmdrop's, sees the compacted input and the rows handed to the LLM."""
    seen = {}

    def hook(m, a, k):
        mm = k.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            seen["rows"] = [r.detach().clone() for r in mm["image"].pooler_output]
            seen["input_ids"] = k["input_ids"].clone()
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def encoded(model, inputs):
    kw = {"pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:
        kw["image_sizes"] = inputs["image_sizes"]
    with torch.no_grad():
        return list(model.model.get_image_features(**kw, return_dict=True).pooler_output)


def reference_embeds(model, inputs, b, rows):
    """Sample b alone, unpadded, its (only) image's placeholders shrunk to len(rows), holding `rows`."""
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
    ph = (ids == image_id).nonzero(as_tuple=True)[0]
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[ph[rows.shape[0]:]] = False
    ids = ids[keep]
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)[None].clone()
        emb[0, ids == image_id] = rows.to(emb.dtype)
    return emb


@pytest.mark.parametrize("budget", [1.0, 10_000])
def test_full_budget_is_identity(kind, budget):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmdrop.dropping(model, "visionzip", budget=budget) as h:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    assert all(s.n_kept == s.n_before and s.n_new == 0 for s in h.stats.images)


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.77, 7])
def test_exact_counts_and_split(kind, budget):
    model, proc = get_model(kind)
    sizes = IMAGE_SIZES if kind == "llava_next" else IMAGE_SIZES[:3]
    inputs = batch(proc, sizes)
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=budget) as h:
        seen, hook = captured_rows(model)  # registered after vlmdrop's hook: sees its output
        try:
            model(**inputs)
        finally:
            hook.remove()
    image_id = model.config.image_token_id
    for b, s in enumerate(h.stats.images):
        assert s.sample == b and s.n_kept == resolve_budget(budget, s.n_before)
        assert sum(s.crop_budgets) == s.n_kept == s.kept_indices.numel() + s.n_new  # no newline overflow here
        if kind == "llava":  # the share split by the documented ratio (a crop kept whole has no contextual part)
            assert s.n_new == sum(split_budget(k)[1] for k in s.crop_budgets if k < 16)
        assert s.n_new == (0 if s.new_groups is None else len(s.new_groups))
        k = s.kept_indices
        assert torch.all(k[1:] > k[:-1])
        assert seen["rows"][b].shape[0] == s.n_kept
        assert int((seen["input_ids"][b] == image_id).sum()) == s.n_kept


def test_llava_selection_matches_official_algorithm():
    """Independently computed CLS attention / keys / hidden of layer -2 through the ops function."""
    model, proc = get_model("llava")
    inputs = batch(proc, MIXED)
    pre, hs = pre_projector_rows(model, inputs)
    vt = model.model.vision_tower
    layer = getattr(vt, "vision_model", vt).encoder.layers[-2]
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.layer_norm1(hs[-3])  # input of layer -2
        q, kk = attn.q_proj(x), attn.k_proj(x)  # (B, 17, 32)
        B, N, D = kk.shape
        H = attn.num_heads
        qh = q.view(B, N, H, D // H).transpose(1, 2)
        kh = kk.view(B, N, H, D // H).transpose(1, 2)
        cls = ((qh[:, :, :1] @ kh.transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0, 1:]  # (B, H, 16)
        keys = kh[:, :, 1:]  # (B, H, 16, Dh)
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=9) as h:
        model(**inputs)
    d, c = split_budget(9)
    for b, s in enumerate(h.stats.images):
        r = visionzip_select(cls[b], keys[b], pre[b], dominant=d, contextual=c)
        assert s.kept_indices.tolist() == r.dominant_idx.tolist()
        assert [g.tolist() for g in s.new_groups] == [g.tolist() for g in r.groups]


@pytest.mark.parametrize("budget", [0.4, 0.75])
def test_forward_equals_reference(kind, budget):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    feats = encoded(model, inputs)
    pre, _ = pre_projector_rows(model, inputs)
    pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=budget) as h:
        seen, hook = captured_rows(model)
        try:
            out = model(**inputs, position_ids=pos).logits
        finally:
            hook.remove()
    proj = model.model.multi_modal_projector
    for b, s in enumerate(h.stats.images):
        assert s.n_new > 0
        with torch.no_grad():
            ctx = torch.stack([merged(pre[b], g) for g in s.new_groups])  # (n_new, C)
            rows = torch.cat([feats[b][s.kept_indices], proj(ctx)])  # dominant first, then contextual
        torch.testing.assert_close(seen["rows"][b], rows, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            ref = model(inputs_embeds=reference_embeds(model, inputs, b, rows)).logits[0]
        torch.testing.assert_close(out[b, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)


def test_generate_and_remove(kind):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    hooks_before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h = vlmdrop.apply(model, "visionzip", budget=0.25)
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (len(MIXED), inputs["input_ids"].shape[1] + 4)
        assert all(s.n_kept == resolve_budget(0.25, s.n_before) for s in h.stats.images)
        h.remove()
        assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref)


def test_bf16_runs():
    shared, proc = get_model("llava_next")
    model = copy.deepcopy(shared).to(torch.bfloat16)  # a copy: a bf16 round trip would change the shared weights
    inputs = batch(proc, MIXED)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=0.3) as h:
        model.generate(**inputs, max_new_tokens=2)
    assert [s.n_kept for s in h.stats.images] == [resolve_budget(0.3, s.n_before) for s in h.stats.images]


@pytest.mark.parametrize("params,match", [({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"),
                                          ({"ratio": 0}, "ratio"), ({"ratio": "5"}, "ratio"),
                                          ({"ratio": float("inf")}, "ratio"), ({"dominant": 54}, "dominant")])
def test_bad_input(params, match):
    model, _ = get_model("llava")
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, "visionzip", **params)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == before


def test_generate_equals_reference():
    """Greedy generate on a left-padded LLaVA-NeXT batch == each sample alone with the expected rows."""
    model, proc = get_model("llava_next")
    inputs = batch(proc, MIXED)
    feats = encoded(model, inputs)
    pre, _ = pre_projector_rows(model, inputs)
    n_new = 5
    with torch.no_grad():
        with vlmdrop.dropping(model, "visionzip", budget=0.5) as h:
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        L = inputs["input_ids"].shape[1]
        for b, s in enumerate(h.stats.images):
            ctx = torch.stack([merged(pre[b], g) for g in s.new_groups])
            rows = torch.cat([feats[b][s.kept_indices], model.model.multi_modal_projector(ctx)])
            emb = reference_embeds(model, inputs, b, rows)
            ref = model.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                 max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            assert out[b, L:].tolist() == ref[0, -n_new:].tolist()


def test_eager_and_sdpa_agree(kind):
    from vlmdrop.zoo.tiny import tiny_llava, tiny_llava_next

    build = tiny_llava if kind == "llava" else tiny_llava_next
    inputs = None
    got = {}
    for attn in ("sdpa", "eager"):
        model, proc = build(attn_implementation=attn)  # fresh: other tests may have round-tripped shared weights
        inputs = inputs or batch(proc, MIXED)
        with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=0.4) as h:
            model(**inputs)
        got[attn] = [(s.kept_indices.tolist(), [g.tolist() for g in s.new_groups]) for s in h.stats.images]
    assert got["sdpa"] == got["eager"]
