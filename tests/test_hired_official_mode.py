"""HiRED `mode="official-code"` on LLaVA-NeXT: behaviour at the edges of the official code."""

import torch
from conftest import batch, get_model

import vlmdrop


def test_official_code_rate_one_keeps_every_unpadded_token():
    """hasanar1f/HiRED skips HiRED when token_budget_rate >= 1.0 (an all-ones mask, MLN L989-1006) and
    packs without newlines: every unpadded crop token survives, not the floored allocation."""
    model, proc = get_model("llava_next")
    # grids 2x2 (no unpadding: 16 + 64 positions), 1x3 and 2x1 (unpadded); the floored allocation
    # would lose tokens on each of them
    inputs = batch(proc, [(112, 112), (60, 130), (90, 50)])
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=1.0, mode="official-code") as h:
        model(**inputs)
    for s, n_crops in zip(h.stats.images, [5, 4, 3]):
        assert s.crop_budgets == [16] * n_crops  # the all-ones mask: N per crop
    with torch.no_grad():
        enc = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                              return_dict=True)
    for s, feats, (hh, ww) in zip(h.stats.images, enc.pooler_output, [(112, 112), (60, 130), (90, 50)]):
        assert s.n_before == feats.shape[0]
        newline = (feats == model.model.image_newline.to(feats.dtype)).all(dim=-1)  # (n_before,) newline rows
        assert int(newline.sum()) > 0
        content = (~newline).nonzero(as_tuple=True)[0]  # (n,) every unpadded crop token
        assert s.n_kept == content.numel() == sum(s.crop_kept), (hh, ww)
        assert torch.equal(s.kept_indices, content), (hh, ww)
