"""The vision-stage engine on LLaVA / LLaVA-NeXT, what the property grid (`test_properties.py`) does not
cover: crop shares capped by the unpadded crop size, seeded sampling, a saved checkpoint, HiRED's
official-code mode."""

import pytest
import torch
from conftest import batch, get_model

import vlmdrop

MIXED = [(60, 130), (90, 50), (56, 56)]  # grids 1x3, 2x1, 1x2 -> different lengths, left padding


def test_crop_budget_caps_llava_next():
    model, proc = get_model("llava_next")
    inputs = batch(proc, [(40, 170)])  # 1x3 grid, heavily unpadded
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.9) as h:
        model(**inputs)
    s = h.stats.images[0]
    assert len(s.crop_budgets) == 4
    hw = 16
    assert s.crop_budgets[0] <= hw and sum(s.crop_budgets) <= s.n_kept


def test_sampling_generate_runs_and_is_seeded(kind):
    model, proc = get_model(kind)
    inputs = batch(proc, MIXED)
    outs = []
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2):
        for _ in range(2):
            torch.manual_seed(123)
            outs.append(model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=20))
    assert outs[0].shape == (len(MIXED), inputs["input_ids"].shape[1] + 5)
    assert torch.equal(outs[0], outs[1])


def test_from_pretrained_checkpoint(tmp_path, kind):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = get_model(kind)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    lproc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    inputs = batch(lproc, MIXED)
    with torch.no_grad(), vlmdrop.dropping(loaded, "hired", budget=0.2) as h:
        out = loaded.generate(**inputs, max_new_tokens=3)
    assert out.shape[0] == len(MIXED) and len(h.stats.images) == len(MIXED)


def test_hired_official_code_mode():
    """Compatibility mode: the official code's counts (int(n_crops*N*rate), row bands, floors, no newlines)."""
    from vlmdrop.ops.hired_official import official_total_budget

    model, proc = get_model("llava_next")
    inputs = batch(proc, [(120, 110), (90, 50)])  # grids 2x2 and 2x1: 16 base patches split into 4 | 2 bands
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.5, mode="official-code") as h:
        model.generate(**inputs, max_new_tokens=2)
    for s, n_crops in zip(h.stats.images, [5, 3]):
        assert len(s.crop_budgets) == n_crops
        total = official_total_budget(n_crops, tokens_per_crop=16, rate=0.5)
        assert s.crop_budgets[0] == min(int(total * 0.5), 16)
        assert sum(s.crop_budgets) <= total
        assert all(k <= b for k, b in zip(s.crop_kept, s.crop_budgets)) and s.n_kept == sum(s.crop_kept)
    with pytest.raises(ValueError, match="official-code"):
        vlmdrop.apply(model, "hired", budget=64, mode="official-code")
