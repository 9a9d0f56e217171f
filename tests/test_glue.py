"""The glue's structure (issue 12): one adapter contract, one per-forward state, one prefill hook, one
selection loop used by every vision-stage path.  Models configured unlike the shared fixtures (other
seeds, 3 ViT layers, 2 decoder layers; an open_clip tower with a 5x5 grid)."""

import json

import pytest
import torch
from conftest import batch

import vlmdrop
from vlmdrop.adapters import HFVlmAdapter, ImageInput
from vlmdrop.interface import ImageTokens
from vlmdrop.methods.random import Random
from vlmdrop.stats import DropStats
from vlmdrop.testing import tiny_internvl, tiny_llava_next

PROMPT = "USER: <image>\nwhat is the shape ? ASSISTANT:"
_MODELS: dict = {}


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = {"llava_next": lambda: tiny_llava_next(seed=21, vision_layers=3, text_layers=2),
                           "internvl": lambda: tiny_internvl(seed=22, vision_layers=3, text_layers=2)}[family]()
    return _MODELS[family]


def _inputs(family, proc, sizes):
    prompt = PROMPT.replace("<image>", "<IMG_CONTEXT>") if family == "internvl" else PROMPT
    return batch(proc, sizes, prompts=[prompt] * len(sizes), seed=3)


def test_adapter_contract_is_abstract():
    """An architecture implements the abstract methods of `HFVlmAdapter`; a missing one is a TypeError."""
    assert HFVlmAdapter.__abstractmethods__ == {"encode", "on_encoded", "images", "with_features"}

    class Half(HFVlmAdapter):
        supported = ("Nothing",)

        def encode(self, kw):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Half(torch.nn.Linear(1, 1))


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_images_gives_rows_and_layout_of_every_image(family):
    """`images(encoder_output, input_ids)` returns every image's rows and its full `ImageTokens`."""
    model, proc = model_of(family)
    inputs = _inputs(family, proc, [(60, 130), (90, 50)])
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3) as h:
        ad = h._installation.adapter
        kw = {"pixel_values": inputs["pixel_values"]}
        if "image_sizes" in inputs:
            kw["image_sizes"] = inputs["image_sizes"]
        got = ad.images(ad.encode(kw), inputs["input_ids"])
        rows_only = ad.images(ad.encode(kw), inputs["input_ids"], layouts=False)
    assert len(got) == 2 and all(isinstance(im, ImageInput) for im in got)
    n_ph = int((inputs["input_ids"] == ad.image_token_id).sum())
    assert sum(im.rows.shape[0] for im in got) == n_ph
    for im, ro in zip(got, rows_only):
        assert isinstance(im.tokens, ImageTokens) and im.tokens.n_before == im.rows.shape[0]
        assert set(im.tokens.cls_attn) == {"first", "feature"}
        assert ro.tokens is None and torch.equal(ro.rows, im.rows)


def test_stacked_install_is_one_prefill_hook():
    """Vision and LLM stage together put one pre-hook and one (always-called) forward hook on the model."""
    model, proc = model_of("llava_next")
    before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with vlmdrop.dropping(model, ["hired", "fastv"], hired={"budget": 0.5}, fastv={"layer": 1, "keep": 0.5}):
        assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (before[0] + 1, before[1] + 1)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == before


def test_stats_written_once_per_prefill_through_the_setter():
    """`handle.stats` is published once per prefill (decode steps keep the object), by the public
    setter, which refuses anything but a DropStats; no stage reads it (overwriting it mid-generate
    changes nothing in the stacked result)."""
    model, proc = model_of("llava_next")
    inputs = _inputs("llava_next", proc, [(60, 130), (120, 110)])
    params = dict(hired={"budget": 0.4}, fastv={"layer": 1, "keep": 0.5})
    with torch.no_grad(), vlmdrop.dropping(model, ["hired", "fastv"], **params) as h:
        with pytest.raises(TypeError, match="DropStats"):
            h.stats = []
        writes = []
        cls = type(h)
        setter = cls.stats.fset

        def spy(self, value):
            writes.append(value)
            setter(self, value)

        cls.stats = property(cls.stats.fget, spy)
        try:
            ref = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert len(writes) == 1 and h.stats is writes[0]
            ref_stats = [(s.n_kept, s.kept_indices.tolist(), s.layer_tokens) for s in h.stats.images]
            # stats overwritten inside the prefill, between the vision stage and the LLM stage: nothing changes
            seen = []

            def clobber(*a):
                if not seen:
                    seen.append(1)
                    h._stats = DropStats()

            hook = model.model.language_model.register_forward_pre_hook(clobber)
            try:
                again = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            finally:
                hook.remove()
        finally:
            cls.stats = property(cls.stats.fget, setter)
    assert torch.equal(again, ref)
    assert [(s.n_kept, s.kept_indices.tolist(), s.layer_tokens) for s in h.stats.images] == ref_stats


class _FourRows(Random):
    """Random, but the method owns a different budget: 4 rows per image whatever `budget` says."""

    def n_keep(self, image):
        return 4


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_method_owns_its_budget_on_hf_models(family, monkeypatch):
    model, proc = model_of(family)
    inputs = _inputs(family, proc, [(60, 130), (56, 56)])
    monkeypatch.setattr(vlmdrop.registry.get_method("random"), "method", _FourRows)
    with torch.no_grad(), vlmdrop.dropping(model, "random", budget=0.9) as h:
        model(**inputs)
    assert [s.n_kept for s in h.stats.images] == [4, 4]


def test_one_selection_loop_for_hf_models_and_open_clip(tmp_path, monkeypatch):
    """open_clip runs the same loop: the method's own budget, and exact-budget methods are checked while
    a compatibility mode (HiRED official-code, inexact by design) takes the count it gives."""
    open_clip = pytest.importorskip("open_clip")
    path = tmp_path / "vlmdrop-glue-vit.json"
    vision = {"image_size": 40, "layers": 3, "width": 32, "patch_size": 8, "head_width": 8}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(path)
    torch.manual_seed(1)
    clip = open_clip.create_model("vlmdrop-glue-vit", pretrained=None).eval()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # 25 patches, rate 0.2: the official code keeps int(25 * 0.2) = 5, the paper rule round(5.0) = 5;
        # rate 0.3: int(7.5) = 7 against the budget's 8 -- taken as given, not an error
        with vlmdrop.dropping(clip, "hired", budget=0.3, mode="official-code", layer=2) as h:
            clip.encode_image(x)
        assert [s.n_kept for s in h.stats.images] == [7, 7]
        monkeypatch.setattr(vlmdrop.registry.get_method("random"), "method", _FourRows)
        with vlmdrop.dropping(clip, "random", budget=0.9, layer=2) as h:
            clip.encode_image(x)
        assert [s.n_kept for s in h.stats.images] == [4, 4]

        class Short(Random):
            def select(self, image, n_keep, *, generator=None):
                sel = super().select(image, n_keep, generator=generator)
                sel.kept_indices = sel.kept_indices[1:]
                return sel

        monkeypatch.setattr(vlmdrop.registry.get_method("random"), "method", Short)
        with vlmdrop.dropping(clip, "random", budget=0.5, layer=2):
            with pytest.raises(AssertionError, match=r"random gave 11 rows for image 0 \(sample 0\), budget says 12"):
                clip.encode_image(x)
        model, proc = model_of("llava_next")
        with vlmdrop.dropping(model, "random", budget=0.5):
            with pytest.raises(AssertionError, match=r"random gave \d+ rows for image 0 \(sample 0\), budget says"):
                model(**_inputs("llava_next", proc, [(56, 56)]))
