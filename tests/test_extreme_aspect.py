"""Images of extreme aspect ratio (20×2000, 2000×20, 1500×20 px).

LLaVA-NeXT with llava-v1.6's real geometry (336 px crops, 14 px patches, its five
`image_grid_pinpoints`): unpadding leaves the sub-image grid no position at all.  The tower and the
LM are width-reduced random-weight models; the crop / patch sizes and pinpoints are the checkpoint's,
so the processor's placeholder count and the model's unpadding really collapse.

InternVL (`crop_to_patches`, max_patches 12): such images tile into a 1×12 or 12×1 grid plus the
thumbnail, with no padding to remove; checked for the same kind of failure.
"""

import pytest
import torch
from conftest import make_image
from transformers import LlavaNextProcessor

import vlmdrop
from vlmdrop.ops.budget import resolve_budget
from vlmdrop.testing import tiny_llava_next

N = 24 * 24  # tokens per 336 px crop
# (H, W): a picture < 1 patch row high (grid 1x3 -> 0 unpadded rows), < 1 patch column wide (grid 3x1 ->
# 72 rows holding only their newline), the same at 1500 px, and a normal image (grid 1x2, unpadded rows)
SIZES = [(20, 2000), (2000, 20), (1500, 20), (300, 620)]
EXTREME = {(20, 2000): N, (2000, 20): N + 72, (1500, 20): N + 72}  # rows the unmodified model feeds
PROMPT = "USER: <image>\nwhat is the shape ? ASSISTANT:"
VISION = [("hired", {}), ("hired", {"mode": "official-code"}), ("random", {}), ("visionzip", {}), ("pool", {}),
          ("globalcom2", {})]
# every method at 0.2; the overflow onto newline rows (budget > the base image) once per accounting path
CASES = [(m, p, 0.2) for m, p in VISION] + [("hired", {}, 0.95), ("pool", {}, 0.95)]


@pytest.fixture(scope="module")
def v16(tmp_path_factory):
    model, proc = tiny_llava_next(image_size=336, patch_size=14)
    folder = tmp_path_factory.mktemp("llava-v1.6-geometry")
    proc.save_pretrained(folder)  # the real loading path, offline
    proc = LlavaNextProcessor.from_pretrained(folder)
    assert proc.image_processor.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert proc.image_processor.crop_size == {"height": 336, "width": 336} and proc.patch_size == 14
    return model, proc


def _inputs(proc, sizes):
    images = [make_image(h, w, SIZES.index((h, w))) for h, w in sizes]  # one picture per size
    return proc(images=images, text=[PROMPT] * len(sizes), return_tensors="pt", padding=True)


def test_unmodified_model_feeds_base_image_and_newlines_only(v16):
    """What "works" means: the model itself collapses the grid (0 rows, or one bare newline per row);
    a budget of 1.0 reproduces it."""
    model, proc = v16
    inputs = _inputs(proc, SIZES)
    with torch.no_grad():
        enc = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             return_dict=True)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    newline = model.model.image_newline
    for size, feats, n_ph in zip(SIZES, enc.pooler_output, placeholders):
        assert feats.shape[0] == n_ph  # the processor agrees with the model
        if size in EXTREME:
            assert n_ph == EXTREME[size]
            assert bool((feats[N:] == newline.to(feats.dtype)).all())  # after the base image: newlines only
        else:
            assert n_ph > 2 * N  # a normal image keeps sub-image content
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
        with vlmdrop.dropping(model, "hired", budget=1.0):  # budget 1.0 is that model, exactly
            got = model(**inputs).logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,params,budget", CASES,
                         ids=[m + ("-" + "-".join(p.values()) if p else "") + f"-{b}" for m, p, b in CASES])
def test_vision_stage_exact_budget_base_image_carries_it(v16, method, params, budget):
    model, proc = v16
    inputs = _inputs(proc, SIZES)
    official = params.get("mode") == "official-code"
    with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget, **params) as h:
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[0] == len(SIZES)
    stats = h.stats.images
    assert [s.n_before for s in stats[:3]] == [EXTREME[s] for s in SIZES[:3]]
    for size, s in zip(SIZES, stats):
        if not official:
            assert s.n_kept == resolve_budget(budget, s.n_before), (size, s.n_kept)
        if size not in EXTREME:
            continue
        assert len(s.crop_budgets) == 4 and s.crop_kept[1:] == [0, 0, 0], (size, s.crop_kept)
        if official:  # the official code's budget over padded crops; sub-image picks all unpadded away
            assert s.crop_kept[0] == s.crop_budgets[0] == min(int(int(4 * N * budget) * 0.5), N)
            assert s.n_kept == s.crop_kept[0]
            continue
        assert s.crop_budgets[1:] == [0, 0, 0] and s.crop_budgets[0] == min(s.n_kept, N)  # the base carries it
        on_newlines = s.n_kept - N
        kept = s.kept_indices
        if on_newlines > 0:  # only a tall picture has newline rows to spend the overflow on
            assert s.n_new == 0 and kept.tolist() == list(range(N)) + list(range(N, N + on_newlines))
        else:
            assert bool((kept < N).all())
        assert all(bool((g < N).all()) for g in (s.new_groups or []))  # merged / pooled rows: base image only


@pytest.mark.parametrize("method", ["hired", "random", "visionzip", "pool", "globalcom2"])
def test_stacked_with_fastv(v16, method):
    model, proc = v16
    inputs = _inputs(proc, SIZES)
    with torch.no_grad(), vlmdrop.dropping(model, [method, "fastv"], **{method: {"budget": 0.3},
                                                                          "fastv": {"layer": 1, "keep": 0.5}}) as h:
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[0] == len(SIZES)
    for size, s in zip(SIZES, h.stats.images):
        vision_kept = resolve_budget(0.3, s.n_before)
        assert s.layer_tokens[0] == vision_kept and s.n_kept == round(0.5 * vision_kept), size
        if size in EXTREME:
            assert s.crop_kept[1:] == [0, 0, 0]


def test_extreme_image_does_not_change_its_neighbours(v16):
    """The normal image of the mixed batch is reduced exactly as it is alone."""
    model, proc = v16
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2) as h:
        model(**_inputs(proc, SIZES))
        mixed = h.stats.images[-1].kept_indices
        model(**_inputs(proc, SIZES[-1:]))
        alone = h.stats.images[0].kept_indices
    assert torch.equal(mixed, alone)


def test_layout_error_names_the_image(v16, monkeypatch):
    """Any error left in describing an image names its index in the batch and its size."""
    import vlmdrop.adapters.llava as llava_adapter
    from vlmdrop.ops.anyres import content_box_from_layout

    def strict(crop_of, local_index, **kw):  # the pre-fix rule: a grid without positions is an error
        if not bool((crop_of >= 1).any()):
            raise ValueError("layout has no sub-image positions")
        return content_box_from_layout(crop_of, local_index, **kw)

    model, proc = v16
    monkeypatch.setattr(llava_adapter, "content_box_from_layout", strict)
    with pytest.raises(ValueError, match=r"image 1 of 2 in this batch "
                                         r"\(image_sizes \(H, W\) = \(2000, 20\), 4 crops\): "
                                         r"layout has no sub-image positions"):
        with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2):
            model(**_inputs(proc, [SIZES[-1], SIZES[1]]))


@pytest.mark.parametrize("method", ["hired", "random", "visionzip", "pool", "globalcom2"])
def test_internvl_extreme_aspect_ratios(method):
    from vlmdrop.testing import tiny_internvl

    model, proc = tiny_internvl(max_patches=12)  # 64 px tiles of 8 px patches: 16 tokens per tile
    sizes = SIZES[:3] + [(300, 620)]
    images = [make_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    prompt = "USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:"
    inputs = proc(images=images, text=[prompt] * len(sizes), return_tensors="pt", padding=True)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert placeholders[:3] == [(12 + 1) * 16] * 3  # 12 tiles in one row / column + the thumbnail
    with torch.no_grad(), vlmdrop.dropping(model, [method, "fastv"], **{method: {"budget": 0.2},
                                                                          "fastv": {"layer": 1, "keep": 0.5}}) as h:
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    for n_ph, s in zip(placeholders, h.stats.images):
        vision_kept = resolve_budget(0.2, n_ph)
        assert s.n_before == n_ph and s.layer_tokens[0] == vision_kept == sum(s.crop_kept)
        assert s.n_kept == round(0.5 * vision_kept)
