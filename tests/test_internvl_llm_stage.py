"""FastV and PyramidDrop on InternVL (tiles grouped into images by their placeholder runs): per-image stats,
equality with the independent masking reference of `test_llm_stage.py` (logits and greedy `generate` on a
left-padded batch of 3, 1 and 7 tiles, two images in one prompt), identity at keep=1.0, eager vs sdpa,
stacking with HiRED, and bit-identical outputs after `remove()`."""

import pytest
import torch

import vlmdrop
from vlmdrop.zoo.tiny import tiny_internvl

from conftest import batch, make_image
from test_llm_stage import _keep_fastv, _keep_pdrop, _kept_positions, reference_drop

N_LAYERS = 4
PER_TILE = 16  # tiny InternVL: 64 px tiles, 16 tokens per tile
PROMPT = "USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:"
MIXED = [(60, 130), (56, 56), (50, 300)]  # 3, 1 and 7 tiles -> 48, 16, 112 tokens, left padding
TILES = [3, 1, 7]
_MODELS: dict = {}


def model_of(attn: str = "sdpa"):
    if attn not in _MODELS:
        _MODELS[attn] = tiny_internvl(text_layers=N_LAYERS, attn_implementation=attn)
    return _MODELS[attn]


def _inputs(proc, sizes=MIXED):
    return batch(proc, sizes, prompts=[PROMPT] * len(sizes))


@pytest.mark.parametrize("method,params", [("fastv", {"layer": 2, "keep": 1.0}),
                                           ("pdrop", {"layers": (1, 3), "ratio": 1.0})])
def test_keep_everything_is_identity(method, params):
    model, proc = model_of()
    inputs = _inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlmdrop.dropping(model, method, **params) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref, out) and torch.equal(ref_gen, gen)
    assert [(s.sample, s.n_before) for s in h.stats.images] == [(b, n * PER_TILE) for b, n in enumerate(TILES)]
    for s in h.stats.images:
        assert s.n_kept == s.n_before and s.layer_tokens == [s.n_before] * N_LAYERS
        assert torch.equal(s.kept_indices, torch.arange(s.n_before))


def _n_keep(method, params):
    if method == "fastv":
        return [params["layer"]], _keep_fastv(params["keep"])
    return list(params["layers"]), _keep_pdrop(params["ratio"])


@pytest.mark.parametrize("method,params,positions", [
    ("fastv", {"layer": 2, "keep": 0.25}, "original"),
    ("pdrop", {"layers": (1, 3), "ratio": 0.5}, "compact"),
    ("pdrop", {"layers": (1, 3), "ratio": 0.5, "score_layer": "previous"}, "original"),
])
def test_forward_and_generate_equal_masking_reference(method, params, positions):
    """Per image (not per tile) budgets; each sample keeps its own top tokens, as the reference ranks them."""
    model, proc = model_of()
    ref_model, _ = model_of("eager")
    inputs = _inputs(proc)
    n_new = 4
    layers, n_keep = _n_keep(method, params)
    with torch.no_grad():
        with vlmdrop.dropping(model, method, positions=positions, **params) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        counts = [s.n_before for s in h.stats.images]
        assert counts == [n * PER_TILE for n in TILES]
        score = params.get("score_layer", "current") if method == "pdrop" else "previous"
        ref, kept = reference_drop(ref_model, inputs, counts, layers, n_keep, positions, score=score)
        assert [s.kept_indices.tolist() for s in h.stats.images] == [k.tolist() for k in kept]
        with ref:
            ref_out = ref_model(**inputs).logits
            ref_gen = ref_model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    keep = _kept_positions(ref) & inputs["attention_mask"].bool()
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out[keep], ref_out[keep], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)
    for s, k in zip(h.stats.images, kept):
        assert s.n_kept == len(k) == s.kept_indices.numel() and len(s.layer_tokens) == N_LAYERS
        assert s.layer_tokens[: layers[0]] == [s.n_before] * layers[0] and s.layer_tokens[-1] == s.n_kept
    if method == "fastv":  # one budget per image over all its tiles: round(0.25 * tiles * 16)
        assert [s.n_kept for s in h.stats.images] == [round(0.25 * n * PER_TILE) for n in TILES]


def test_two_images_in_one_prompt_and_text_only_row():
    model, proc = model_of()
    ref_model, _ = model_of("eager")
    imgs = [make_image(60, 130, 0), make_image(56, 56, 1), make_image(200, 100, 2)]
    prompts = ["USER: <IMG_CONTEXT>\nwhat is the shape ? and <IMG_CONTEXT>\nthe colour ? ASSISTANT:",
               "USER: what color ? ASSISTANT:", PROMPT]
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        with vlmdrop.dropping(model, "fastv", layer=2, keep=0.3) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert [(s.sample, s.n_before) for s in h.stats.images] == [(0, 48), (0, 16), (2, 48)]
        counts = [s.n_before for s in h.stats.images]
        ref, kept = reference_drop(ref_model, inputs, counts, [2], _keep_fastv(0.3))
        assert [s.kept_indices.tolist() for s in h.stats.images] == [k.tolist() for k in kept]
        with ref:
            ref_out = ref_model(**inputs).logits
            ref_gen = ref_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    keep = _kept_positions(ref) & inputs["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref_out[keep], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


def test_eager_and_sdpa_agree():
    inputs = _inputs(model_of()[1])
    res = {}
    for attn in ("sdpa", "eager"):
        model, _ = model_of(attn)
        with torch.no_grad(), vlmdrop.dropping(model, "pdrop", layers=(1, 2), ratio=0.5) as h:
            logits = model(**inputs).logits[:, -1]
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        res[attn] = ([s.kept_indices.tolist() for s in h.stats.images], logits, gen)
    assert res["sdpa"][0] == res["eager"][0]
    torch.testing.assert_close(res["sdpa"][1], res["eager"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(res["sdpa"][2], res["eager"][2])


def test_stacked_hired_and_fastv():
    model, proc = model_of()
    ref_model, _ = model_of("eager")
    inputs = _inputs(proc)
    with torch.no_grad():
        with vlmdrop.dropping(model, ["hired", "fastv"], hired={"budget": 0.4}, fastv={"keep": 0.5}) as h:
            gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert h.method == "hired+fastv"
        with vlmdrop.dropping(ref_model, "hired", budget=0.4) as hv:
            ref_model(**inputs)
            vis = [s.kept_indices for s in hv.stats.images]
            counts = [s.n_kept for s in hv.stats.images]
            ref, kept = reference_drop(ref_model, inputs, counts, [2], _keep_fastv(0.5))
            with ref:
                ref_gen = ref_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(gen, ref_gen)
    for s, v, k, n in zip(h.stats.images, vis, kept, TILES):
        assert s.method == "hired+fastv" and s.n_before == n * PER_TILE and s.n_kept == round(0.5 * len(v))
        assert s.kept_indices.tolist() == v[k].tolist()  # indices into n_before of the surviving tokens
        assert s.layer_tokens == [len(v)] * 2 + [s.n_kept] * 2
        assert len(s.crop_kept) == n and sum(s.crop_kept) == len(v)  # the vision stage's per-tile accounting


def _hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), type(m)) for n, m in model.named_modules()}


@pytest.mark.parametrize("method,params", [("pdrop", {"layers": [1, 2], "ratio": 0.4}),
                                           (["hired", "fastv"], {"hired": {"budget": 0.3}, "fastv": {"keep": 0.3}})])
def test_remove_restores_model_exactly(method, params):
    model, proc = model_of()
    inputs = _inputs(proc)
    before = _hooks(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h = vlmdrop.apply(model, method, **params)
        assert _hooks(model) != before
        model.generate(**inputs, max_new_tokens=4)
        h.remove()
        h.remove()
        assert _hooks(model) == before
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


def test_placeholder_and_feature_mismatch_is_an_error():
    model, proc = model_of()
    inputs = _inputs(proc, MIXED[:2])
    with torch.no_grad(), vlmdrop.dropping(model, "fastv", keep=0.5):
        bad = dict(inputs, pixel_values=inputs["pixel_values"][:-1])  # one tile missing
        with pytest.raises(ValueError, match=r"placeholders describe 64 visual rows \(\[48, 16\] per image\) but "
                                             r"the image features hold 48 rows"):
            model(**bad)


def test_sliding_window_layers_are_refused():
    model, _ = model_of()
    cfg = model.model.language_model.config
    saved = list(cfg.layer_types)
    before = _hooks(model)
    cfg.layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    try:
        with pytest.raises(ValueError, match=r"decoder layers \[2, 3\] use \['sliding_attention'\]"):
            vlmdrop.apply(model, "fastv", layer=2)
    finally:
        cfg.layer_types = saved
    assert _hooks(model) == before and not getattr(model.__dict__.get("_vlmdrop_handle"), "active", False)
