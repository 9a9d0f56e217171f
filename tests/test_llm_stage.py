"""LLM prefill-stage dropping (FastV, PyramidDrop): parameter errors, a prompt ending with an image, labels
without a cache and seeded sampling.  Identity, exact counts, the masking reference (forward, cache step,
generate; stacked with a vision stage), eager vs sdpa, bf16 and `remove()` are properties of the grid
(`test_properties.py`, reference in `references.py`)."""

import pytest
import torch
from conftest import batch, get_model

import vlmdrop

MIXED = [(60, 130), (90, 50), (56, 56)]  # LLaVA-NeXT: 52, 56, 36 image tokens -> left padding


def model_of(kind: str, attn: str = "sdpa"):
    """The suite's one model cache (4 decoder layers)."""
    return get_model(kind, attn)


def _hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), type(m)) for n, m in model.named_modules()}


@pytest.mark.parametrize("method,params,match", [
    ("fastv", {"layer": 4}, r"layer=4 is out of range .* 4 decoder layers \(valid: 1\.\.3"),
    ("fastv", {"layer": 0}, r"layer=0 must be an int >= 1"),
    ("fastv", {"keep": 0.0}, r"keep=0\.0"),
    ("fastv", {"keep": 1.5}, r"keep=1\.5"),
    ("fastv", {"keep": -3}, r"keep=-3"),
    ("fastv", {"positions": "abs"}, r"positions='abs' .* original, compact"),
    ("pdrop", {}, r"layers=8 is out of range"),
    ("pdrop", {"layers": (2, 1)}, r"strictly increasing"),
    ("pdrop", {"layers": (1, 2), "ratio": (0.5,)}, r"ratio=\(0\.5,\) has 1 values but layers"),
    ("pdrop", {"layers": (1, 2), "ratio": 1.5}, r"ratio=1\.5"),
    ("pdrop", {"layers": (1, 2), "ratio": 10**400}, r"every ratio must be a number in \(0, 1\]"),
    ("pdrop", {"layers": (1, 2), "score_layer": "next"},
     r"score_layer='next' is not valid; choose one of: current, previous"),
    ("pdrop", {"layers": (1, 4)}, r"layers=4 is out of range .* 4 decoder layers \(valid: 1\.\.3\)"),
    ("pdrop", {"layers": (1, 4), "score_layer": "previous"},
     r"layers=4 is out of range .* layer K is scored by layer K-1"),
    (["hired", "random"], {}, r"all vision-stage methods"),
    (["fastv", "pdrop"], {}, r"all llm-stage methods"),
    (["hired", "fastv"], {"budget": 0.2}, r"unexpected keyword\(s\) \['budget'\]"),
    (["hired", "fastv"], {"fastv": 0.5}, r"fastv=0\.5: the parameters of 'fastv' must be a dict"),
    (["hired", "fastv"], {"fastv": {"keepp": 1}}, r"unknown parameter\(s\) \['keepp'\] for method 'fastv'"),
    (["hired", "hired"], {}, r"names a method twice"),
])
def test_bad_parameters(method, params, match):
    model, _ = model_of("llava")
    before = _hooks(model)
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, method, **params)
    assert _hooks(model) == before and model.__dict__.get("_vlmdrop_handle") is None


def test_prompt_ending_with_image_is_an_error():
    model, proc = model_of("llava")
    inputs = batch(proc, [(56, 56)], prompts=["USER: what ? <image>"])
    with torch.no_grad(), vlmdrop.dropping(model, "fastv", keep=0.5):
        with pytest.raises(ValueError, match="last prompt token .* is an image token"):
            model(**inputs)


def test_sampling_no_cache_and_labels():
    model, proc = model_of("llava_next")
    inputs = batch(proc, MIXED)
    with torch.no_grad(), vlmdrop.dropping(model, "fastv", layer=2, keep=0.5) as h:
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
        out = model(**inputs, labels=labels, use_cache=False)
        assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.loss)
        outs = []
        for _ in range(2):
            torch.manual_seed(5)
            outs.append(model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=10))
        assert torch.equal(outs[0], outs[1])
    assert [s.n_kept for s in h.stats.images] == [round(s.n_before / 2) for s in h.stats.images]


@pytest.mark.parametrize("n_layers,n_before", [(3, 105), (5, 105), (5, 201), (32, 576), (7, 10)])
@pytest.mark.parametrize("budget", [0.1, 0.05, 0.2, 0.3])
def test_pdrop_budget_leaves_round_budget_n_after_its_last_stage(n_layers, n_before, budget):
    """A budget mapped to per-stage ratios (budget ** (1/n)) leaves round(budget * n) tokens after the last stage,
    as every other method keeps: the ratios' float product (0.1 ** (1/3) cubed is 0.10000000000000002) once kept 11
    of 105 tokens at a budget of 0.1 on a 5-layer LM (three stages)."""
    from vlmdrop.eval.params import method_params
    from vlmdrop.methods.pdrop import PDrop, PDropConfig

    kw = method_params("pdrop", budget, num_layers=n_layers)
    method = PDrop(PDropConfig(**kw))
    last = len(method.config.layers) - 1  # the default 8/16/24 on 32 layers
    assert method.n_keep(last, n_before, n_before) == max(1, round(budget * n_before))
