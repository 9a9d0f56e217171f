"""FastV and PyramidDrop on InternVL, what the property grid (`test_properties.py`) does not cover: a
placeholder / feature mismatch error and sliding-window decoder layers refused.  Identity, per-image counts
over all tiles, the masking reference (two images in one prompt, a text-only row), eager vs sdpa, stacking
and `remove()` on InternVL are grid cells."""

import pytest
import torch
from conftest import batch, get_model

import vlmdrop

PROMPT = "USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:"
MIXED = [(60, 130), (56, 56), (50, 300)]  # 3, 1 and 7 tiles -> 48, 16, 112 tokens, left padding


def model_of(attn: str = "sdpa"):
    """The suite's one model cache (4 decoder layers)."""
    return get_model("internvl", attn)


def _inputs(proc, sizes=MIXED):
    return batch(proc, sizes, prompts=[PROMPT] * len(sizes))


def _hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), type(m)) for n, m in model.named_modules()}


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
