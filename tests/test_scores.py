"""The CLS-free saliency score ("received"): the attention each patch receives, mean over queries, per head.

Checked against explicit N×N attention (the eager tower's own `output_attentions`), on a CLIP tower where
it is selectable (`score="received"`) next to the CLS row, and option validation."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_OPEN_CLIP, batch, get_model

import vlmdrop
from vlmdrop.adapters.vision_capture import saliency_from_projections
from vlmdrop.methods.globalcom2 import GlobalCom2Config
from vlmdrop.methods.hired import Hired, HiredConfig
from vlmdrop.methods.visionzip import VisionZipConfig
from vlmdrop.ops.attention import resolve_score


def test_received_equals_explicit_softmax_column_mean():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 37, 32, generator=g), torch.randn(3, 37, 32, generator=g)  # (B, N, H*hd)
    got = saliency_from_projections(q, k, score="received", num_heads=4, scale=0.3)  # (B, H, N)
    qh, kh = q.view(3, 37, 4, 8).transpose(1, 2), k.view(3, 37, 4, 8).transpose(1, 2)
    attn = (qh @ kh.transpose(-1, -2) * 0.3).softmax(-1)  # (B, H, N, N) explicit
    torch.testing.assert_close(got, attn.mean(dim=2), atol=1e-6, rtol=1e-5)
    cls = saliency_from_projections(q, k, score="cls", num_heads=4, scale=0.3)
    torch.testing.assert_close(cls, attn[:, :, 0], atol=1e-6, rtol=1e-5)


def test_resolve_score_rule():
    assert resolve_score("auto", has_cls=True) == "cls"
    assert resolve_score("auto", has_cls=False) == "received"
    assert resolve_score("received", has_cls=True) == "received"
    with pytest.raises(ValueError, match="no CLS token"):
        resolve_score("cls", has_cls=False, tower="SigLIP tower")
    with pytest.raises(ValueError, match="'mean'"):
        resolve_score("mean", has_cls=True)


@pytest.mark.parametrize("cfg", [HiredConfig, VisionZipConfig, GlobalCom2Config])
def test_score_option_is_validated(cfg):
    assert cfg().score == "auto"
    with pytest.raises(ValueError, match="score='rows'"):
        cfg(score="rows")


_ORIGINAL_SELECT = Hired.select


def _captured(monkeypatch, model, inputs, **params):
    seen = []
    orig = _ORIGINAL_SELECT

    def spy(self, image, n_keep, **kw):
        seen.append(image.cls_attn)
        return orig(self, image, n_keep, **kw)

    monkeypatch.setattr(Hired, "select", spy)
    with torch.no_grad(), vlmdrop.dropping(model, "hired", **params):
        model(**inputs)
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_received_score_on_a_clip_tower_equals_explicit_attention(monkeypatch, attn):
    """LLaVA-NeXT (CLS tower, 4 layers, another seed): score='received' hands HiRED the column mean of
    the eager tower's attention matrices at the first and feature layers (CLS query included, CLS column
    removed); score='cls' hands it the CLS row."""
    model, proc = get_model("llava_next", attn, seed=1, vision_layers=4)
    eager, _ = get_model("llava_next", "eager", seed=1, vision_layers=4)
    inputs = batch(proc, [(60, 130), (90, 50)])
    with torch.no_grad():
        pv = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], [4, 3])])  # base + grid crops
        out = eager.model.vision_tower(pv, output_attentions=True)
    first, feat = out.attentions[0], out.attentions[4 + model.config.vision_feature_layer]  # (C, H, N, N)
    received = _captured(monkeypatch, model, inputs, budget=0.3, score="received")
    cls = _captured(monkeypatch, model, inputs, budget=0.3)
    for kind, images, ref_of in (("received", received, lambda a: a.mean(dim=2)[..., 1:]),
                                 ("cls", cls, lambda a: a[:, :, 0, 1:])):
        got_first = torch.cat([im["first"] for im in images])  # (C, H, h*w)
        got_feat = torch.cat([im["feature"] for im in images])
        torch.testing.assert_close(got_first, ref_of(first), atol=1e-5, rtol=1e-4, msg=kind)
        torch.testing.assert_close(got_feat, ref_of(feat), atol=1e-5, rtol=1e-4, msg=kind)
    assert not torch.allclose(received[0]["feature"], cls[0]["feature"])


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="needs open_clip and torchvision")
def test_received_score_on_an_open_clip_tower(monkeypatch):
    """open_clip (its own capture from the packed in_proj): score='received' is the column mean of
    `nn.MultiheadAttention`'s own attention probabilities at the feature block (CLS column removed)."""
    model, _ = get_model("open_clip", "native")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    blocks = model.visual.transformer.resblocks
    inputs = {}
    hook = blocks[1].register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            model.encode_image(x)
    finally:
        hook.remove()
    before = inputs["x"] if model.visual.transformer.batch_first else inputs["x"].transpose(0, 1)
    with torch.no_grad():
        inp = blocks[1].ln_1(before)
        _, w = blocks[1].attn(inp, inp, inp, need_weights=True, average_attn_weights=False)  # (B, H, T, T)
    for score, ref in (("received", w.mean(dim=2)[..., 1:]), ("cls", w[:, :, 0, 1:])):
        seen = []

        def spy(self, image, n_keep, **kw):
            seen.append(image.cls_attn["feature"])
            return _ORIGINAL_SELECT(self, image, n_keep, **kw)

        monkeypatch.setattr(Hired, "select", spy)
        with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.5, layer=2, score=score,
                                               first_layer=1, feature_layer=1):
            model.encode_image(x)
        torch.testing.assert_close(torch.cat(seen), ref, atol=1e-5, rtol=1e-4, msg=score)
