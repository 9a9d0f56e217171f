"""LLaVA-OneVision specifics (the shared properties run in `test_properties.py`): the packed-row map against
the model's and the processor's own layout where large grids are down-sampled bilinearly, the CLS-free
score against explicit attention, multi-image budgets, the forward / greedy `generate` reference on a model
configured differently from the grid's, and the refusals (video, score='cls')."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import get_model, make_image
from references import cumsum_positions, image_refs, sample_embeds, sample_reference, vision_rows
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

import vlmdrop
from vlmdrop.methods.hired import Hired
from vlmdrop.ops.anyres import base_region_map

PROMPT = "USER: <image>\nwhat is the shape ? ASSISTANT:"
# (H, W) -> grid on the 56 px crops of the tiny model (pinpoints up to 3x3)
SIZES = [(60, 130), (120, 110), (160, 160), (110, 170), (90, 50), (40, 170), (56, 56)]

_ORIGINAL_SELECT = Hired.select


def _images_seen(monkeypatch, model, inputs, **params):
    """The `ImageTokens` HiRED receives (and its stats), one forward."""
    seen = []

    def spy(self, image, n_keep, **kw):
        seen.append(image)
        return _ORIGINAL_SELECT(self, image, n_keep, **kw)

    monkeypatch.setattr(Hired, "select", spy)
    with torch.no_grad(), vlmdrop.dropping(model, "hired", **params) as h:
        model(**inputs)
    monkeypatch.setattr(Hired, "select", _ORIGINAL_SELECT)
    return seen, h.stats.images


def _bilinear_1d(n_in: int, n_out: int) -> list[list[tuple[int, float]]]:
    """PyTorch's bilinear (align_corners=False) source taps of each output index: [(index, weight)]."""
    taps = []
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        taps.append([(i0, 1.0 - lam), (i1, lam)])
    return taps


def _manual_pack(per_patch: torch.Tensor, size, cfg, h: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Sub-image grid rows of one image by hand: stitch, unpad, down-sample by the anyres_max rule with
    explicit bilinear taps.  per_patch (n_crops, h*h, c) -> ((R, W', c) rows, (R, W', 2) nearest source
    (row, col) in the padded stitched grid, (top, left, height, width) of the unpadded grid in it)."""
    gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    c = per_patch.shape[-1]
    grid = per_patch[1:].reshape(gh, gw, h, h, c).permute(4, 0, 2, 1, 3).reshape(c, gh * h, gw * h)
    coords = torch.stack(torch.meshgrid(torch.arange(gh * h), torch.arange(gw * h), indexing="ij")).double()
    grid, coords = unpad_image(grid, size), unpad_image(coords, size)  # (c, H', W'), (2, H', W')
    _, hh, ww = grid.shape
    box = (int(coords[0].min()), int(coords[1].min()), hh, ww)
    max_n = int(cfg.vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(hh * ww / (max_n * h ** 2))
    if ratio <= 1.1:
        return grid.permute(1, 2, 0), coords.permute(1, 2, 0).long(), box
    oh, ow = int(hh // ratio), int(ww // ratio)
    ty, tx = _bilinear_1d(hh, oh), _bilinear_1d(ww, ow)
    out = torch.zeros(oh, ow, c, dtype=torch.float64)
    near = torch.zeros(oh, ow, 2, dtype=torch.long)
    for i in range(oh):
        for j in range(ow):
            for (y, wy) in ty[i]:
                for (x, wx) in tx[j]:
                    out[i, j] += wy * wx * grid[:, y, x].double()
            y = ty[i][1][0] if ty[i][1][1] > 0.5 else ty[i][0][0]  # nearest tap, ties to the lower index
            x = tx[j][1][0] if tx[j][1][1] > 0.5 else tx[j][0][0]
            near[i, j] = coords[:, y, x].long()
    return out, near, box


@pytest.mark.parametrize("size,aspect", [(s, "anyres_max_4") for s in SIZES]
                         # 12x12 -> 4x4: every sample lands exactly on a patch (3i + 1), still a down-sampling
                         + [((160, 160), "anyres_max_1"), ((60, 130), "anyres_max_1")])
def test_packed_row_map_matches_model_and_processor(monkeypatch, size, aspect):
    """Per image: the processor's placeholder count, the model's own rows (the projector output stitched,
    unpadded and down-sampled by hand), and the adapter's map: newline after every grid row, each grid
    row anchored at its nearest source patch, its score the same bilinear mix, HiRED's region map."""
    model, proc = get_model("llava_onevision", "eager", vision_aspect_ratio=aspect)
    cfg = model.config
    h = cfg.vision_config.image_size // cfg.vision_config.patch_size
    inputs = proc(images=[make_image(*size, 3)], text=[PROMPT], return_tensors="pt")
    n_ph = int((inputs["input_ids"] == cfg.image_token_id).sum())
    post = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: post.setdefault("out", o))
    try:
        (im,), (st,) = _images_seen(monkeypatch, model, inputs, budget=0.5, score="received")
    finally:
        hook.remove()
    ref = image_refs(model, inputs)[0]
    assert im.n_before == st.n_before == n_ph == ref.rows.shape[0]
    with torch.no_grad():
        pv = inputs["pixel_values"][0, :im.n_crops]
        attn = model.model.vision_tower(pv, output_attentions=True).attentions  # (crops, H, N, N) each
    feature = attn[model.config.vision_feature_layer % len(attn)].mean(dim=2)  # (crops, H, N) explicit
    rows, near, box = _manual_pack(post["out"].double(), size, cfg, h)  # the model's rows, by hand
    scores, _, _ = _manual_pack(feature.transpose(1, 2).double(), size, cfg, h)  # (R, W', H)
    r, wcols = rows.shape[:2]
    n = h * h
    assert im.n_before == n + r * (wcols + 1)
    grid_pos = torch.arange(n, im.n_before).reshape(r, wcols + 1)
    assert (im.crop_of[grid_pos[:, -1]] == -1).all()  # one newline row closes each grid row
    content = grid_pos[:, :-1].reshape(-1)  # (r*w',) positions of the grid rows
    torch.testing.assert_close(ref.rows[content].double(), rows.reshape(-1, rows.shape[-1]), atol=1e-5, rtol=1e-5)
    gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    near = near.reshape(-1, 2)
    assert im.crop_of[content].tolist() == (1 + (near[:, 0] // h) * gw + near[:, 1] // h).tolist()
    assert im.local_index[content].tolist() == ((near[:, 0] % h) * h + near[:, 1] % h).tolist()
    got = im.cls_attn["feature"][im.crop_of[content], :, im.local_index[content]]  # (r*w', H)
    torch.testing.assert_close(got.double(), scores.reshape(-1, scores.shape[-1]), atol=1e-6, rtol=1e-5)
    # HiRED's base-image -> sub-image map: the full-resolution unpadded box, not the anchors' (which skip its border)
    assert im.base_region.tolist() == base_region_map(crop_hw=(h, h), grid_hw=(gh, gw), content_box=box).tolist()


def test_received_score_is_the_siglip_attention_column_mean(monkeypatch):
    """SigLIP has no CLS token: score='auto' is the attention received, mean over queries, of the first and
    the feature layer (eager attention matrices), for a multi-image prompt (one crop per image)."""
    model, proc = get_model("llava_onevision", "sdpa")
    eager, _ = get_model("llava_onevision", "eager")
    images = [[make_image(60, 130, 0), make_image(90, 50, 1), make_image(56, 56, 2)]]
    inputs = proc(images=images, text=["USER: <image>\n<image>\nand <image>\nwhat ? ASSISTANT:"], return_tensors="pt")
    seen, stats = _images_seen(monkeypatch, model, inputs, budget=0.3)
    with torch.no_grad():
        attn = eager.model.vision_tower(inputs["pixel_values"][:, 0], output_attentions=True).attentions
    for role, layer in (("first", 0), ("feature", model.config.vision_feature_layer % len(attn))):
        torch.testing.assert_close(torch.cat([im.cls_attn[role] for im in seen]), attn[layer].mean(dim=2),
                                   atol=1e-6, rtol=1e-5)
    assert [(s.sample, s.n_before, s.n_kept) for s in stats] == [(0, 17, 5)] * 3  # each image its own budget


def test_score_cls_and_video_are_refused():
    model, proc = get_model("llava_onevision", "sdpa")
    with pytest.raises(ValueError, match="no CLS token"):
        vlmdrop.apply(model, "visionzip", budget=0.3, score="cls")
    assert not model._forward_pre_hooks  # nothing left behind
    ids = torch.tensor([[1, model.config.video_token_id, 5]])
    with vlmdrop.dropping(model, "hired", budget=0.3), pytest.raises(ValueError, match="video input"):
        model(input_ids=ids, pixel_values_videos=torch.zeros(1, 1, 3, 56, 56))


@pytest.mark.parametrize("method,params", [("hired", {"budget": 0.3}), ("visionzip", {"budget": 0.4, "ratio": 1.0}),
                                           ("pool", {"budget": 0.3}), ("globalcom2", {"budget": 0.3})])
def test_forward_and_generate_equal_reference_anyres_max_2(method, params):
    """A differently configured model (anyres_max_2: the 2x1 and 1x3 grids are down-sampled too, 2 vision
    layers, another seed), a left-padded batch of single images of different grids."""
    model, proc = get_model("llava_onevision", "sdpa", seed=2, vision_layers=2, vision_aspect_ratio="anyres_max_2")
    images = [make_image(*s, i) for i, s in enumerate([(90, 50), (40, 170), (160, 160)])]
    prompts = [PROMPT, "USER: <image>\nis there a red circle in the picture ? ASSISTANT:", "USER: <image>\nhow ?"]
    inputs = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    mask, length = inputs["attention_mask"], inputs["input_ids"].shape[1]
    with torch.no_grad():
        with vlmdrop.dropping(model, method, **params) as h:
            out = model(**inputs, position_ids=cumsum_positions(mask))
            stats = list(h.stats.images)
            gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        refs = image_refs(model, inputs)
        assert [(s.sample, s.n_before) for s in stats] == [(im.sample, im.rows.shape[0]) for im in refs]
        assert all(s.n_kept == round(params["budget"] * s.n_before) for s in stats)
        rows = [vision_rows(model, im, s) for im, s in zip(refs, stats)]
        for b in range(3):
            emb, spans = sample_embeds(model, inputs, b, refs, rows)
            ref = sample_reference(model, emb, spans, None, n_new=3, next_token=int(out.logits[b, -1].argmax()))
            torch.testing.assert_close(out.logits[b, -emb.shape[1]:], ref.logits, atol=1e-4, rtol=1e-4)
            assert gen[b, length:].tolist() == ref.tokens


def test_run_and_eval_accept_a_onevision_checkpoint(tmp_path, capsys):
    """`vlmdrop run` and `vlmdrop eval` on a saved OneVision checkpoint folder (what a hub id such as
    llava-hf/llava-onevision-qwen2-0.5b-ov-hf loads as): AutoModelForImageTextToText + AutoProcessor."""
    from vlmdrop.cli import main
    from vlmdrop.eval.cli import cli

    model, proc = get_model("llava_onevision", "sdpa")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    make_image(160, 160).save(tmp_path / "img.png")  # a 3x3 grid, down-sampled: 88 visual tokens
    rc = main(["run", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"), "--question",
               "what color ?", "--method", "hired", "--budget", "0.3", "--max-new-tokens", "2", "--repeat", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(88 visual tokens)" in out and "hired    (26 visual tokens)" in out, out
    rc = cli(["--model", str(tmp_path / "ckpt"), "--task", "easyvqa", "--limit", "2", "--method", "visionzip",
              "--budget", "0.25", "--max-new-tokens", "2", "--batch-size", "2", "--out", str(tmp_path / "o"),
              "--no-progress"])
    assert rc == 0
    assert "| visionzip | 0.25 |" in capsys.readouterr().out
