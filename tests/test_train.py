"""vlmdrop.zoo.train: a few steps end to end, the saved folder loads through from_pretrained /
AutoProcessor, the early chance check stops a run, and the AnyRes tile mapping is right."""

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("easy_vqa")

from vlmdrop.zoo.mini import MiniConfig, build_mini_processor  # noqa: E402
from vlmdrop.zoo.train import (  # noqa: E402
    ChanceError,
    TrainArgs,
    patch_labels,
    shape_tile_index,
    tile_box,
    train,
    view_around,
    zoom_view,
)

SMALL = MiniConfig(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)


def _args(out, **kw):
    base = dict(out=str(out), seed=0, minutes=5, steps_a=2, steps_b=3, batch=2, eval_n=3, check_at=0,
                save_every=2, progress=False, model=SMALL)
    base.update(kw)
    return TrainArgs(**base)


def test_tiny_run_end_to_end_and_loads(tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

    out = tmp_path / "run"
    result = train(_args(out))
    assert result["finished"] and set(result) >= {"shape", "color", "yes_no", "all"}
    assert (out / "model.safetensors").is_file() and (out / "train_state.pt").is_file()
    model = LlavaNextForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaNextProcessor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (336, 672), "white"), text=prompt, return_tensors="pt")
    assert "<unk>" not in processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 2
    # the evaluation module runs on the saved model, with and without dropping
    from vlmdrop.zoo.easyvqa_hr import easyvqa_hr_records
    from vlmdrop.zoo.evaluate import evaluate_dropping

    recs = list(easyvqa_hr_records("test", seed=0, n=4))
    full = evaluate_dropping(model, processor, recs, None, 1.0, batch=4)
    hired = evaluate_dropping(model, processor, recs, "hired", 0.1, batch=4)
    assert full["touch"] == 1.0 and 0.0 <= hired["touch_grid"] <= hired["touch"] <= 1.0
    assert hired["kept_mean"] < 30
    # a second call on the finished folder resumes from the saved state: same weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train(_args(out))["finished"]
    again = LlavaNextForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_early_check_stops_a_run_at_chance(tmp_path):
    with pytest.raises(ChanceError, match=r"shape accuracy .* chance 0\.333"):
        train(_args(tmp_path / "chance", steps_a=0, steps_b=2, check_at=0.5, check_shape=1.01))
    assert (tmp_path / "chance" / "train_state.pt").is_file()


@pytest.mark.parametrize("size", [(336, 672), (672, 336), (672, 672), (1008, 336), (500, 700), (700, 500)])
def test_shape_tile_index_finds_the_tile_with_the_shape(size):
    processor = build_mini_processor()
    ip = processor.image_processor
    w, h = size
    rng = np.random.default_rng(w * 7 + h)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        img = Image.new("RGB", size, "white")
        img.paste(Image.new("RGB", (40, 40), (255, 0, 0)), (x0, y0))
        pv = ip(images=[img], return_tensors="pt")["pixel_values"][0]  # (P, 3, s, s)
        red = ((pv[:, 0] > 1.0) & (pv[:, 1] < -1.0)).flatten(1).sum(1)  # (P,) red pixels per view
        crop = ip.crop_size["height"]
        bbox = (x0, y0, x0 + 40, y0 + 40)
        tile = shape_tile_index(size, bbox, ip.image_grid_pinpoints, crop)
        assert tile >= 1 and red[tile] == red[1:].max() > 0, (size, (x0, y0), tile, red.tolist())
        # tile_box: the red pixels of that tile lie in the mapped box (1 px of resampling slack)
        ys, xs = torch.nonzero((pv[tile, 0] > 1.0) & (pv[tile, 1] < -1.0), as_tuple=True)
        bx0, by0, bx1, by1 = tile_box(size, bbox, ip.image_grid_pinpoints, crop, tile)
        assert xs.min() >= bx0 - 1 and xs.max() < bx1 + 1 and ys.min() >= by0 - 1 and ys.max() < by1 + 1
        # patch_labels marks exactly the patches holding most of the red
        patch = processor.patch_size
        g = crop // patch
        per_patch = ((pv[tile, 0] > 1.0) & (pv[tile, 1] < -1.0)).reshape(g, patch, g, patch).sum((1, 3)).reshape(-1)
        labels = patch_labels((bx0, by0, bx1, by1), 5, crop, patch)
        assert set(labels.unique().tolist()) <= {0, 5}
        assert bool((per_patch[labels == 5] > 0).all())
        assert bool((per_patch[labels == 0] < 0.25 * patch * patch + patch).all())
    view = zoom_view(img, (x0, y0, x0 + 40, y0 + 40), rng, 168)
    assert view.size == (168, 168)


def test_view_around_maps_the_box_into_the_view():
    rng = np.random.default_rng(0)
    img = Image.new("RGB", (672, 336), "white")
    bbox = (400, 100, 430, 140)
    img.paste(Image.new("RGB", (30, 40), (255, 0, 0)), bbox[:2])
    for side in (60, 150, 224, 1000):  # 1000: clipped to the canvas' short side
        view, box = view_around(img, bbox, rng, 112, side)
        assert view.size == (112, 112)
        arr = np.asarray(view, dtype=np.int32)
        ys, xs = np.nonzero((arr[..., 0] > 200) & (arr[..., 1] < 60))
        assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1
        assert 0 <= box[0] < box[2] <= 112 and 0 <= box[1] < box[3] <= 112


def test_patch_labels_overlap_rule():
    # box covering a quarter of patch (0, 1) and most of patch (1, 0): 16 px patches of a 112 px view
    labels = patch_labels((10, 10, 40, 30), 2, 112, 16).reshape(7, 7)
    assert labels[0, 1] == 2 and labels[1, 0] == 2 and labels[1, 1] == 2 and labels[1, 2] == 2
    assert labels[0, 0] == 0 and labels.sum() == 2 * 4
    # a box smaller than a quarter patch still labels the patch holding half of it
    assert patch_labels((50, 50, 54, 54), 1, 112, 16).sum() == 1


def test_stage_a_check_reports_tower_accuracy(tmp_path):
    with pytest.raises(ChanceError, match=r"end of stage A .* colour accuracy .* chance 0\.125"):
        train(_args(tmp_path / "a", steps_a=1, steps_b=2, check_at=0.5, check_color=1.01, check_shape=0.0))


def test_cli_runs_and_writes_the_model(tmp_path, capsys):
    import json

    from vlmdrop.zoo.train import main

    out = tmp_path / "cli"
    rc = main(["--out", str(out), "--steps-a", "1", "--steps-b", "1", "--batch", "1", "--eval-n", "2", "--check-at", "0",
               "--no-progress", "--crop", "56", "--patch", "14", "--vision-layers", "2", "--text-layers", "1",
               "--feature-layer", "1", "--cls-shape", "zoom"])
    assert rc == 0 and (out / "model.safetensors").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finished"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_feature_layer"] == 1 and cfg["vision_config"]["patch_size"] == 14


def test_args_are_validated():
    with pytest.raises(ValueError, match="cls_shape"):
        TrainArgs(out="x", cls_shape="tiles")
    with pytest.raises(ValueError, match="batch"):
        TrainArgs(out="x", batch=0)


def test_two_runs_of_the_same_command_give_the_same_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_args(a))
    train(_args(b))
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
