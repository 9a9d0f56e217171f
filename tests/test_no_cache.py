"""`generate(use_cache=False)`: every step is a new prefill on the prompt plus the tokens so far.

Vision-stage methods select from the images alone, so every step selects the same rows and the tokens
equal the cached run's.  LLM-stage methods would re-rank at every step by the newest token, so
`generate(use_cache=False)` is refused; a single `model(**inputs, use_cache=False)` is one prefill and
runs.  Models configured unlike the shared fixtures (other seeds, 3 decoder layers).
"""

import pytest
import torch
from conftest import batch, get_model

import vlmdrop

N_NEW = 5
SIZES = [(60, 130), (90, 50)]
SEEDS = {"llava": 21, "llava_next": 22, "internvl": 23}


def model_of(family):
    return get_model(family, seed=SEEDS[family], text_layers=3)


def _inputs(family, proc):
    image = "<IMG_CONTEXT>" if family == "internvl" else "<image>"
    prompts = [f"USER: {image}\nwhat is the shape ? ASSISTANT:", f"USER: {image}\nwhat color is this ? ASSISTANT:"]
    return batch(proc, SIZES, prompts=prompts)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                              # random weights: never generate a placeholder
                              suppress_tokens=[model.config.image_token_id], **kw)


def _stats(handle):
    return [(s.sample, s.n_kept, s.kept_indices.tolist(), s.n_new) for s in handle.stats.images]


VISION = [("hired", {"budget": 0.3}), ("random", {"budget": 0.3, "seed": 4}), ("visionzip", {"budget": 0.4}),
          ("pool", {"budget": 0.3}), ("globalcom2", {"budget": 0.3})]


@pytest.mark.parametrize("method,params", VISION, ids=[m for m, _ in VISION])
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_vision_stage_without_cache_gives_the_cached_tokens(family, method, params):
    if method == "globalcom2" and family == "llava":
        pytest.skip("globalcom2 needs a thumbnail and crops (LLaVA-NeXT, InternVL)")
    model, proc = model_of(family)
    inputs = _inputs(family, proc)
    with vlmdrop.dropping(model, method, **params) as h:
        cached = _generate(model, inputs)
        cached_stats = _stats(h)
        uncached = _generate(model, inputs, use_cache=False)
        assert _stats(h) == cached_stats
    assert torch.equal(uncached, cached)


LLM = [("fastv", {"layer": 1, "keep": 0.4}), ("pdrop", {"layers": [1, 2], "ratio": 0.5}),
       (["hired", "fastv"], {"hired": {"budget": 0.5}, "fastv": {"layer": 2, "keep": 0.5}})]


@pytest.mark.parametrize("method,params", LLM, ids=["fastv", "pdrop", "hired+fastv"])
@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_llm_stage_refuses_generate_without_cache(family, method, params):
    model, proc = model_of(family)
    inputs = _inputs(family, proc)
    with vlmdrop.dropping(model, method, **params) as h:
        ref = _generate(model, inputs)
        ref_stats = _stats(h)
        with torch.no_grad():
            ref_logits = model(**inputs).logits
        with pytest.raises(ValueError, match=r"LLM-stage method and generate\(use_cache=False\) re-runs the prefill"):
            _generate(model, inputs, use_cache=False)
        assert _stats(h) == ref_stats
        # a single forward without a cache is one prefill: the same drop, the same logits
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        assert out.cache is None and torch.equal(out.logits, ref_logits) and _stats(h) == ref_stats
        assert torch.equal(_generate(model, inputs), ref)  # nothing left behind by the refused call
