"""GlobalCom2 as a method: crop retention and token scores on hand-made maps (InternVL layout with the
thumbnail last, LLaVA-NeXT layout with unpadding and newlines) and the pre-softmax capture.  On the real
classes (identity, exact budgets, reference equality, backends, bf16, `remove()`, stacked with FastV) it is
a column of the property grid (`test_properties.py`)."""

import pytest
import torch
from conftest import batch, get_model

import vlmdrop
from vlmdrop.interface import ImageTokens
from vlmdrop.methods.globalcom2 import GlobalCom2, GlobalCom2Config, _crop_boxes
from vlmdrop.ops.globalcom2 import crop_keep_counts, crop_retention, crop_token_scores, official_crop_boxes
from vlmdrop.ops.topk import top_k

MIXED = [(60, 130), (90, 50), (56, 56)]


def _internvl_like(scores: torch.Tensor) -> ImageTokens:
    """Two 4x4 tiles side by side (grid 1x2) then the thumbnail; `scores` is (3, H, 16)."""
    from vlmdrop.ops.anyres import base_region_map

    return ImageTokens(n_before=48, crop_of=torch.arange(3).repeat_interleave(16),
                       local_index=torch.arange(16).repeat(3),
                       crop_hw=(4, 4), n_crops=3, cls_attn={"score": scores}, base_crop=2, grid_hw=(1, 2),
                       base_region=base_region_map(crop_hw=(4, 4), grid_hw=(1, 2), content_box=(0, 0, 4, 8)))


def test_internvl_layout_budgets_and_picks_follow_the_formulas():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 16, generator=g) * 3  # (crops, H, 16) pre-softmax logits
    image = _internvl_like(scores)
    sel = GlobalCom2(GlobalCom2Config(budget=0.3, temperature=2.0)).select(image, 14)
    s = scores.mean(1)  # (3, 16)
    ratio = 14 / 48
    r = crop_retention(s[2], image.base_region, 2, base_ratio=ratio, temperature=2.0)
    expected = crop_keep_counts([16, 16, 16], [float(r[0]), float(r[1]), ratio], total=14)
    assert sel.crop_budgets == expected == sel.crop_kept and sum(expected) == 14
    kept = sel.kept_indices
    for crop, (c0, c1) in enumerate([(0, 4), (4, 8)]):
        local = crop_token_scores(s[crop], s[2].reshape(4, 4), full_hw=(4, 8), crop_rows=(0, 4), crop_cols=(c0, c1))
        got = kept[(kept // 16) == crop] % 16
        assert got.tolist() == top_k(local, expected[crop]).tolist()
    assert (kept[kept >= 32] - 32).tolist() == top_k(s[2], expected[2]).tolist()


def test_thumbnail_attention_moves_budget_to_its_crop():
    scores = torch.zeros(3, 1, 16)
    scores[2, 0, torch.tensor([0, 1, 4, 5, 8, 9])] = 4.0  # the thumbnail looks at the left half (tile 0)
    sel = GlobalCom2(GlobalCom2Config(budget=0.5, temperature=1.0)).select(_internvl_like(scores), 24)
    assert sum(sel.crop_budgets) == 24
    assert sel.crop_budgets[0] > sel.crop_budgets[1]
    assert sel.crop_budgets[2] == 8  # the thumbnail keeps the budget's fraction


def _llava_next_unpadded() -> tuple[ImageTokens, list[int]]:
    """LLaVA-NeXT packing of a 1x2 grid of 4x4 crops whose top and bottom rows were unpadded away:
    base (16), then stitched rows 1 and 2 (8 tokens each, crop 1 then crop 2) each followed by a newline."""
    crop_of, local = [0] * 16, list(range(16))
    for r in (1, 2):
        for crop in (1, 2):
            crop_of += [crop] * 4
            local += [r * 4 + c for c in range(4)]
        crop_of.append(-1)
        local.append(-1)
    from vlmdrop.ops.anyres import base_region_map

    base_region = base_region_map(crop_hw=(4, 4), grid_hw=(1, 2), content_box=(1, 0, 2, 8))
    return ImageTokens(n_before=len(crop_of), crop_of=torch.tensor(crop_of), local_index=torch.tensor(local),
                       crop_hw=(4, 4), n_crops=3, cls_attn={}, base_region=base_region, grid_hw=(1, 2)), [16, 8, 8]


def test_unpadded_crop_boxes_match_the_official_layout():
    image, caps = _llava_next_unpadded()
    assert image.crop_sizes() == caps
    full, boxes, _ = official_crop_boxes((100, 400), n_rows=1, n_cols=2, side=4)  # 1 row cut top and bottom
    got = _crop_boxes(image)
    assert got[1] == (full, boxes[0][:2], boxes[0][2:]) and got[2] == (full, boxes[1][:2], boxes[1][2:])


def test_llava_next_layout_picks_and_newlines():
    image, _ = _llava_next_unpadded()
    g = torch.Generator().manual_seed(1)
    image.cls_attn = {"score": torch.randn(3, 2, 16, generator=g)}
    method = GlobalCom2(GlobalCom2Config(budget=0.5))
    sel = method.select(image, 17)
    assert sel.kept_indices.numel() == 17 and sum(sel.crop_budgets) == 17
    assert not bool(torch.isin(sel.kept_indices, image.layout_positions()).any())  # newlines only on overflow
    s = image.cls_attn["score"].mean(1)
    pos1 = image.crop_positions(1)
    local = crop_token_scores(s[1][image.local_index[pos1]], s[0].reshape(4, 4), full_hw=(2, 8), crop_rows=(0, 2),
                              crop_cols=(0, 4))
    assert sel.kept_indices[torch.isin(sel.kept_indices, pos1)].tolist() == \
        pos1[top_k(local, sel.crop_budgets[1])].tolist()
    full = method.select(image, image.n_before)
    assert full.kept_indices.tolist() == list(range(image.n_before))


def test_config_errors_carry_values():
    with pytest.raises(ValueError, match="temperature=0"):
        GlobalCom2Config(temperature=0)
    with pytest.raises(ValueError, match="budget=1.5"):
        GlobalCom2Config(budget=1.5)
    with pytest.raises(ValueError, match="score_layer='last'"):
        GlobalCom2Config(score_layer="last")
    with pytest.raises(ValueError, match="unknown parameter"):
        vlmdrop.apply(get_model("llava_next")[0], "globalcom2", alpha=0.5)
    assert "globalcom2" in vlmdrop.methods()


def test_logit_capture_softmaxes_to_eager_attention():
    """The pre-softmax role: softmax over (CLS + patches) of the captured logits is the eager row."""
    from vlmdrop.adapters.state import EncodeRecord
    from vlmdrop.adapters.vision_capture import ClsRowCapture

    model, proc = get_model("llava_next", "eager")
    inputs = batch(proc, MIXED[:1])
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    cap = ClsRowCapture({"score": layer, "attn": layer}, num_heads=layer.num_heads, scale=layer.scale,
                        logit_roles=("score",))
    try:
        record = EncodeRecord()
        cap.begin(record)  # the hooks record between begin() and end() (the adapter brackets each encode)
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values=inputs["pixel_values"][0], output_attentions=True)
        cap.end()
        rows = record.cls_rows
    finally:
        cap.remove()
    eager = out.attentions[-1][:, :, 0]  # (crops, H, N)
    torch.testing.assert_close(rows["score"].softmax(-1), eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rows["attn"], eager, atol=1e-5, rtol=1e-4)
