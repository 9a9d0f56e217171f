"""Integer parameters that could overflow or fall out of range are refused by `apply` (a ValueError
naming the value), never by the first `generate`; the edges of the valid ranges work end to end."""

import pytest
import torch
from conftest import batch, get_model

import vlmdrop


def model_of():
    return get_model("llava_next", seed=31, text_layers=3)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method,params,match", [
    ("random", {"seed": 2**70}, r"seed=1180591620717411303424 must be an int in \[0, 2\*\*64 - 1\]"),
    ("random", {"seed": 2**64}, r"seed=18446744073709551616 must be an int in \[0, 2\*\*64 - 1\]"),
    ("random", {"seed": -1}, r"seed=-1 must be an int in \[0, 2\*\*64 - 1\]"),
    ("random", {"seed": 1.0}, r"seed=1\.0 must be an int"),
    ("globalcom2", {"temperature": 10**400}, r"temperature=1000.* must be a finite number > 0"),
    ("visionzip", {"ratio": 10**400}, r"ratio=1000.* must be a finite number > 0"),
    ("pdrop", {"layers": [1, 2], "ratio": (0.5, 10**400)}, r"every ratio must be a number in \(0, 1\], got 1000"),
    ("hired", {"first_layer": 2**70}, r"first_layer=1180591620717411303424 is out of range"),
    ("hired", {"feature_layer": -(2**70)}, r"feature_layer=-1180591620717411303424 is out of range"),
    ("globalcom2", {"score_layer": 2**70}, r"score_layer=1180591620717411303424 is out of range"),
    ("fastv", {"layer": 2**70}, r"layer=1180591620717411303424 is out of range"),
    ("pdrop", {"layers": [1, 2**70]}, r"layers=1180591620717411303424 is out of range"),
])
def test_out_of_range_integers_are_refused_at_apply(method, params, match):
    model, _ = model_of()
    before = _hooks(model)
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, method, **params).remove()  # remove() only runs if apply wrongly accepts
    assert _hooks(model) == before and model.__dict__.get("_vlmdrop_handle") is None


@pytest.mark.parametrize("method,params", [
    ("random", {"budget": 0.3, "seed": 2**64 - 1}), ("random", {"budget": 0.3, "seed": 0}),
    ("random", {"budget": 2**70}),  # a count above every image's size keeps everything
    ("fastv", {"layer": 1, "keep": 2**70}),
    ("globalcom2", {"budget": 0.3, "temperature": 10**300}),  # a large int that is still a float
    ("visionzip", {"budget": 0.3, "ratio": 10**300}),
])
def test_range_edges_run(method, params):
    model, proc = model_of()
    inputs = batch(proc, [(60, 130), (90, 50)])
    with torch.no_grad(), vlmdrop.dropping(model, method, **params) as h:
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    if params.get("budget") == 2**70 or params.get("keep") == 2**70:
        assert all(s.n_kept == s.n_before for s in h.stats.images)
