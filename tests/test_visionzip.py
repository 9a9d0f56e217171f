"""VisionZip on LLaVA: the dominant / contextual split, the selection against the official algorithm on
independently computed ViT tensors, bad input.  Identity, exact counts, the rows the LLM receives (forward,
cache step, generate), eager vs sdpa, bf16 and `remove()` are grid cells (`test_properties.py`)."""

import pytest
import torch
from conftest import IMAGE_SIZES, batch, get_model
from references import image_refs

import vlmdrop
from vlmdrop.ops.visionzip import split_budget, visionzip_select

MIXED = [(60, 130), (90, 50), (56, 56)]


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.77, 7])
def test_contextual_count_follows_ratio(budget):
    """LLaVA-1.5: each crop's share splits into dominant + contextual tokens by the documented ratio (a crop
    kept whole has no contextual part); the grid checks the counts themselves."""
    model, proc = get_model("llava")
    inputs = batch(proc, IMAGE_SIZES[:3])
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=budget) as h:
        model(**inputs)
    for s in h.stats.images:
        assert s.n_new == sum(split_budget(k)[1] for k in s.crop_budgets if k < 16)


def test_llava_selection_matches_official_algorithm():
    """Independently computed CLS attention / keys / hidden of layer -2 through the ops function."""
    model, proc = get_model("llava")
    inputs = batch(proc, MIXED)
    pre = [im.pre for im in image_refs(model, inputs)]  # (16, C) per image: the projector's input
    vt = model.model.vision_tower
    with torch.no_grad():
        hs = vt(inputs["pixel_values"], output_hidden_states=True).hidden_states  # layers + 1
    layer = getattr(vt, "vision_model", vt).encoder.layers[-2]
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.layer_norm1(hs[-3])  # input of layer -2
        q, kk = attn.q_proj(x), attn.k_proj(x)  # (B, 17, 32)
        B, N, D = kk.shape
        H = attn.num_heads
        qh = q.view(B, N, H, D // H).transpose(1, 2)
        kh = kk.view(B, N, H, D // H).transpose(1, 2)
        cls = ((qh[:, :, :1] @ kh.transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0, 1:]  # (B, H, 16)
        keys = kh[:, :, 1:]  # (B, H, 16, Dh)
    with torch.no_grad(), vlmdrop.dropping(model, "visionzip", budget=9) as h:
        model(**inputs)
    d, c = split_budget(9)
    for b, s in enumerate(h.stats.images):
        r = visionzip_select(cls[b], keys[b], pre[b], dominant=d, contextual=c)
        assert s.kept_indices.tolist() == r.dominant_idx.tolist()
        assert [g.tolist() for g in s.new_groups] == [g.tolist() for g in r.groups]


@pytest.mark.parametrize("params,match", [({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"),
                                          ({"ratio": 0}, "ratio"), ({"ratio": "5"}, "ratio"),
                                          ({"ratio": float("inf")}, "ratio"), ({"dominant": 54}, "dominant")])
def test_bad_input(params, match):
    model, _ = get_model("llava")
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, "visionzip", **params)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == before


