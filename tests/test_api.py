"""Public API contract: registry, validation errors, double apply, unsupported models, clean failure."""

import pytest
import torch
from conftest import batch, get_model
from torch import nn

import vlmdrop
from vlmdrop.methods.hired import HiredConfig


def test_methods_lists_builtins():
    names = vlmdrop.methods()
    assert {"hired", "random"} <= set(names) and names == sorted(names)


def test_configs_are_frozen_and_validated():
    cfg = HiredConfig(budget=0.2, alpha=0.4)
    with pytest.raises(Exception):
        cfg.budget = 0.5  # frozen
    with pytest.raises(ValueError, match="alpha"):
        HiredConfig(alpha=1.5)
    with pytest.raises(ValueError, match="mode='bogus'.*paper, official-code"):
        HiredConfig(mode="bogus")


@pytest.mark.parametrize("params,match", [
    ({"budget": 0.0}, r"budget=0\.0"), ({"budget": 1.2}, r"budget=1\.2"), ({"budget": 0}, "budget=0"),
    ({"budget": -5}, "budget=-5"), ({"budget": "0.2"}, "budget='0.2'"), ({"budget": True}, "budget=True"),
    ({"budgett": 0.2}, r"unknown parameter\(s\) \['budgett'\].*valid parameters: budget"),
    ({"alpha": -0.1}, "alpha"), ({"first_layer": 99}, "first_layer=99 is out of range"),
])
def test_bad_parameters_raise_value_error(params, match):
    model, _ = get_model("llava")
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, "hired", **params)
    assert model.__dict__.get("_vlmdrop_handle") is None


def test_unknown_method_lists_valid_ones():
    model, _ = get_model("llava")
    with pytest.raises(ValueError, match=r"unknown method 'hiredd'; valid methods: .*hired.*random"):
        vlmdrop.apply(model, "hiredd", budget=0.2)


def test_unsupported_model_names_supported_classes():
    msg = "no adapter for Linear; supported model classes: .*LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match=msg):
        vlmdrop.apply(nn.Linear(2, 2), "hired", budget=0.2)


def test_double_apply_is_an_error_and_remove_allows_again():
    model, _ = get_model("llava_next")
    h = vlmdrop.apply(model, "hired", budget=0.2)
    try:
        with pytest.raises(ValueError, match="already has vlmdrop method 'hired' applied"):
            vlmdrop.apply(model, "random", budget=0.2)
    finally:
        h.remove()
    vlmdrop.apply(model, "random", budget=0.2).remove()


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_failed_apply_leaves_no_hook():
    model, _ = get_model("llava_next")
    before = _all_hooks(model)
    cls = type(model.model)
    with pytest.raises(ValueError, match="feature_layer=50 is out of range"):
        vlmdrop.apply(model, "hired", budget=0.2, feature_layer=50)
    assert _all_hooks(model) == before and type(model.model) is cls


def test_dropping_removes_on_exception():
    model, proc = get_model("llava")
    before = _all_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vlmdrop.dropping(model, "random", budget=64, seed=0) as h:
            assert h.active and _all_hooks(model) > before
            raise RuntimeError("boom")
    assert not h.active and _all_hooks(model) == before


def test_random_is_seeded():
    model, proc = get_model("llava_next")
    inputs = batch(proc, [(60, 130)])
    kept = []
    for seed in (0, 0, 1):
        with torch.no_grad(), vlmdrop.dropping(model, "random", budget=0.3, seed=seed) as h:
            model(**inputs)
        kept.append(h.stats.images[0].kept_indices.tolist())
    assert kept[0] == kept[1] and kept[0] != kept[2]


def test_images_with_inputs_embeds_is_a_clear_error():
    model, proc = get_model("llava")
    inputs = batch(proc, [(60, 60)])
    emb = model.get_input_embeddings()(inputs["input_ids"])
    with vlmdrop.dropping(model, "hired", budget=0.2), pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=emb, pixel_values=inputs["pixel_values"])
