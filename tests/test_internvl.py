"""InternVL specifics (tiles, thumbnail last, pixel shuffle): per-tile accounting, per-tile HiRED, the pooled CLS
rows, the recovered tile grid, one-tile processing, errors, checkpoints and the CLI.  Identity, exact counts,
the hand-built reference (forward, cache step, generate), eager vs sdpa, bf16 and `remove()` on InternVL are
cells of the property grid (`test_properties.py`)."""

import pytest
import torch
from conftest import batch, get_model, make_image

import vlmdrop
from vlmdrop.ops.budget import resolve_budget
from vlmdrop.ops.hired import crop_budgets as hired_crop_budgets
from vlmdrop.ops.tiles import pool_patch_scores

PROMPT = "USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:"
# tiny InternVL: 64 px tiles, 16 tokens per tile, max_patches=6
ONE, THREE, MAX = (56, 56), (60, 130), (50, 300)  # 1 tile (no thumbnail); 2x1 grid + thumbnail; 1x6 + thumbnail
SIZES = [ONE, THREE, (90, 50), MAX, (200, 100), (130, 120)]
TILES = [1, 3, 3, 7, 3, 5]
MIXED = [THREE, ONE, MAX]  # 3, 1, 7 tiles: left padding
METHODS = ["hired", "globalcom2", "random"]
PER_TILE = 16


def _inputs(proc, sizes, seed=0):
    return batch(proc, sizes, prompts=[PROMPT] * len(sizes), seed=seed)


def _adapter(handle):
    return handle._installation.adapter


@pytest.mark.parametrize("budget", [0.05, 0.77, 7, 10_000])
@pytest.mark.parametrize("method", METHODS)
def test_exact_kept_counts_per_tile(method, budget):
    """Per-tile accounting (the grid checks the per-image counts): one share per tile, thumbnail last, and
    the kept positions fall into the tiles as the shares say."""
    model, proc = get_model("internvl")
    inputs = _inputs(proc, SIZES)
    with torch.no_grad(), vlmdrop.dropping(model, method, budget=budget) as h:
        model(**inputs)
    for s, n_tiles in zip(h.stats.images, TILES):
        assert s.n_before == n_tiles * PER_TILE
        assert len(s.crop_budgets) == n_tiles  # tiles in processor order, thumbnail last
        assert s.crop_budgets == s.crop_kept and sum(s.crop_budgets) == s.n_kept
        per_tile = torch.bincount(s.kept_indices // PER_TILE, minlength=n_tiles).tolist()
        assert per_tile == s.crop_kept


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_hired_gives_alpha_to_the_thumbnail(alpha):
    model, proc = get_model("internvl")
    inputs = _inputs(proc, [THREE, MAX])
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.4, alpha=alpha) as h:
        model(**inputs)
    for s in h.stats.images:
        ideal = alpha * s.n_kept
        assert abs(s.crop_budgets[-1] - min(ideal, PER_TILE)) <= 1  # capped at the tile size


def test_hired_splits_tiles_by_thumbnail_regions():
    """Per-tile HiRED on the adapter's own ImageTokens: the shares equal Eq. 1-2 with the thumbnail's
    first-layer attention summed over each tile's 2-D region, and picks are the feature-layer top-k."""
    model, proc = get_model("internvl")
    inputs = _inputs(proc, [MAX, (200, 100)])
    from vlmdrop.methods.hired import Hired, HiredConfig
    from vlmdrop.ops.hired import region_scores
    from vlmdrop.ops.topk import top_k

    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3) as h:
        ad = _adapter(h)
        enc = ad.encode({"pixel_values": inputs["pixel_values"]})
        images = [im.tokens for im in ad.images(enc, inputs["input_ids"])]
    assert [im.grid_hw for im in images] == [(1, 6), (2, 1)]
    assert [im.base_crop for im in images] == [6, 2]
    for im in images:
        n_keep = resolve_budget(0.3, im.n_before)
        sel = Hired(HiredConfig(budget=0.3)).select(im, n_keep)
        first = im.cls_attn["first"][im.base_crop].sum(0)  # (16,) thumbnail
        s = region_scores(first, im.base_region, im.n_crops - 1)
        caps = [PER_TILE] * im.n_crops
        expected = hired_crop_budgets(n_keep, caps, alpha=0.5, sub_scores=s)  # base first
        assert sel.crop_budgets == expected[1:] + expected[:1]  # thumbnail last
        feat = im.cls_attn["feature"].sum(1)  # (n_crops, 16)
        for c, k in enumerate(sel.crop_budgets):
            local = sel.kept_indices[(sel.kept_indices // PER_TILE) == c] % PER_TILE
            assert local.tolist() == top_k(feat[c], k).tolist()


def test_base_region_maps_thumbnail_to_tile_grid():
    model, proc = get_model("internvl")
    inputs = _inputs(proc, [MAX, (200, 100)])
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3) as h:
        ad = _adapter(h)
        enc = ad.encode({"pixel_values": inputs["pixel_values"]})
        images = [im.tokens for im in ad.images(enc, inputs["input_ids"])]
    # 4x4 thumbnail grid; 1x6 tiles: columns 0..3 -> tiles floor((c + .5) * 6 / 4)
    assert images[0].base_region.reshape(4, 4)[0].tolist() == [0, 2, 3, 5]
    # 2x1 tiles: top two thumbnail rows -> tile 0, bottom two -> tile 1
    assert images[1].base_region.reshape(4, 4)[:, 0].tolist() == [0, 0, 1, 1]


def test_tile_grid_recovered_from_thumbnail():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from vlmdrop.ops.tiles import infer_tile_grid

    _, proc = get_model("internvl")
    sizes = [(60, 130), (90, 50), (50, 300), (300, 50), (200, 100), (130, 120), (100, 190), (64, 200)]
    inputs = _inputs(proc, sizes)
    start = 0
    for h, w in sizes:
        cols, rows = get_optimal_tiled_canvas((h, w), (64, 64), 1, 6)
        n = rows * cols
        assert n > 1
        pv = inputs["pixel_values"]
        assert infer_tile_grid(pv[start:start + n], pv[start + n]) == (rows, cols), (h, w)
        start += n + 1


@pytest.mark.parametrize("qk_norm", [False, True])
def test_pooled_cls_rows_match_eager_attention(qk_norm):
    """The captured rows (q_norm/k_norm hooks, CLS column dropped, 2x2 sources summed) equal the eager
    attention probabilities; GlobalCom2's pre-softmax logits agree with them up to the CLS logit."""
    model, proc = get_model("internvl_qknorm" if qk_norm else "internvl", "eager")
    inputs = _inputs(proc, [THREE])
    pv = inputs["pixel_values"]
    with torch.no_grad():
        att = model.model.vision_tower(pixel_values=pv, output_attentions=True).attentions  # per layer (T, H, N+1, N+1)
        for method, role, layer in [("hired", "first", 0), ("hired", "feature", -1), ("globalcom2", "score", -1)]:
            with vlmdrop.dropping(model, method, budget=0.5) as h:
                ad = _adapter(h)
                (im,) = [i.tokens for i in ad.images(ad.encode({"pixel_values": pv}), inputs["input_ids"])]
            got = im.cls_attn[role]  # (3, H, 16)
            row = att[layer][:, :, 0]  # (3, H, 65) CLS row, CLS column first
            if role != "score":
                want = pool_patch_scores(row[..., 1:], ad.sources, ad.local_index)  # (3, H, 16)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            else:  # logit_j - logit_cls = log p_j - log p_cls, so the difference is 4 * logit_cls per (tile, head)
                logit_gap = row[..., 1:].log() - row[..., :1].log()  # (3, H, 64)
                diff = got - pool_patch_scores(logit_gap, ad.sources, ad.local_index)  # (3, H, 16)
                torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), atol=1e-3, rtol=1e-4)


def test_single_tile_processor_without_thumbnail():
    """crop_to_patches=False: every image is one tile, no thumbnail; crops are single tiles."""
    model, proc = get_model("internvl")
    images = [make_image(*THREE, seed=0), make_image(*MAX, seed=1)]
    inputs = proc(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True, crop_to_patches=False)
    assert inputs["pixel_values"].shape[0] == 2
    with torch.no_grad():
        for method in METHODS:
            with vlmdrop.dropping(model, method, budget=0.3) as h:
                model.generate(**inputs, max_new_tokens=2)
            assert [(s.n_before, s.n_kept, s.crop_budgets) for s in h.stats.images] == [(16, 5, [5])] * 2


def test_two_images_in_one_prompt():
    model, proc = get_model("internvl")
    imgs = [make_image(*THREE, seed=0), make_image(*ONE, seed=1), make_image(*MAX, seed=2)]
    prompts = ["USER: <IMG_CONTEXT>\n<IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:", PROMPT]
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.3) as h:
        model.generate(**inputs, max_new_tokens=2)
    assert [s.sample for s in h.stats.images] == [0, 0, 1]
    assert [len(s.crop_budgets) for s in h.stats.images] == [3, 1, 7]


def test_errors_name_the_problem():
    model, proc = get_model("internvl")
    inputs = _inputs(proc, [THREE, ONE])
    with torch.no_grad():
        with pytest.raises(ValueError, match="official-code"):
            with vlmdrop.dropping(model, "hired", budget=0.3, mode="official-code"):
                model(**inputs)
        with vlmdrop.dropping(model, "hired", budget=0.3):
            bad = dict(inputs)
            bad["pixel_values"] = inputs["pixel_values"][:-1]  # one tile missing
            with pytest.raises(ValueError, match="placeholders describe 4 tiles"):
                model(**bad)
            ids = inputs["input_ids"].clone()
            ids[1, (ids[1] == model.config.image_token_id).nonzero()[0]] = 0  # a run of 15
            with pytest.raises(ValueError, match="15 image placeholders"):
                model(**{**inputs, "input_ids": ids})
        enc = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        with vlmdrop.dropping(model, "hired", budget=0.3):
            with pytest.raises(ValueError, match="not encoded while vlmdrop was applied"):
                model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      mm_encoder_outputs={"image": enc})
        with pytest.raises(ValueError, match="score_layer=5 is out of range"):
            vlmdrop.apply(model, "globalcom2", score_layer=5)
    assert "_vlmdrop_handle" not in model.__dict__ or not model.__dict__["_vlmdrop_handle"].active


def test_from_pretrained_checkpoint_and_cli(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from vlmdrop.cli import load_model, main

    model, proc = get_model("internvl")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    loaded, lproc = load_model(str(tmp_path / "ckpt"))
    assert type(loaded) is type(model) and type(loaded) is type(AutoModelForImageTextToText.from_config(model.config))
    assert lproc.image_seq_length == PER_TILE and lproc.image_processor.max_patches == 6
    inputs = _inputs(lproc, MIXED)
    assert torch.equal(inputs["input_ids"], _inputs(proc, MIXED)["input_ids"])
    with torch.no_grad(), vlmdrop.dropping(loaded, "hired", budget=0.2) as h:
        loaded.generate(**inputs, max_new_tokens=2)
    assert len(h.stats.images) == 3
    make_image(*THREE).save(tmp_path / "img.png")
    rc = main(["run", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"), "--method",
               "globalcom2", "--budget", "0.25", "--max-new-tokens", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(48 visual tokens" in out and "globalcom2 (12 visual tokens" in out and "thumbnail last" in out
