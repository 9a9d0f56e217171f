"""`pool` on LLaVA / LLaVA-NeXT: every row is a new one, regions covering each crop's content, the regions
of a grid, bad input.  Identity, exact counts, the pooled rows against a hand-built reference (forward,
cache step, generate), eager vs sdpa, bf16 and `remove()` are grid cells (`test_properties.py`)."""

import pytest
import torch
from conftest import IMAGE_SIZES, batch, get_model
from references import image_refs

import vlmdrop

MIXED = [(60, 130), (90, 50), (56, 56)]


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.77, 7])
def test_exact_counts_and_regions(kind, budget):
    model, proc = get_model(kind)
    sizes = IMAGE_SIZES if kind == "llava_next" else IMAGE_SIZES[:3]
    inputs = batch(proc, sizes)
    images = image_refs(model, inputs)
    with torch.no_grad(), vlmdrop.dropping(model, "pool", budget=budget) as h:
        model(**inputs)
    for s, im in zip(h.stats.images, images):
        assert s.kept_indices.numel() == 0 and s.n_new == s.n_kept == len(s.new_groups)  # all rows are new
        # regions lie on content positions (never LLaVA-NeXT's newline rows) and cover every crop with a share
        covered = torch.unique(torch.cat(s.new_groups))
        content = im.content.nonzero().squeeze(1)
        assert set(covered.tolist()) <= set(content.tolist())
        if all(k > 0 for k in s.crop_budgets):
            assert covered.tolist() == content.tolist()


def test_regions_on_llava_grid():
    """4x4 grid to 4 cells: 2x2 quadrants in raster order."""
    model, proc = get_model("llava")
    inputs = batch(proc, MIXED[:1])
    with torch.no_grad(), vlmdrop.dropping(model, "pool", budget=4) as h:
        model(**inputs)
    groups = [g.tolist() for g in h.stats.images[0].new_groups]
    assert groups == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.parametrize("params", [{"budget": 0.0}, {"budget": -3}, {"budget": "20%"}, {"ratio": 5.4}])
def test_bad_input(params):
    model, _ = get_model("llava")
    with pytest.raises(ValueError):
        vlmdrop.apply(model, "pool", **params)
