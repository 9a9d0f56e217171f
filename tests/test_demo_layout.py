"""vlmdrop.demo.layout: one box per visual position, in the model's order, on the right crop; the pictures."""

import numpy as np
import pytest
import torch
from PIL import Image

import vlmdrop
from vlmdrop.demo.layout import DIM, bar_chart, kept_picture, token_layout
from vlmdrop.eval.loading import build_prompt
from vlmdrop.testing import tiny_internvl, tiny_llava, tiny_llava_next, tiny_llava_onevision, tiny_qwen2_5_vl

# configured unlike tests/conftest.py's fixtures: other tile / patch sizes, so other grids and tokens per tile
MODELS = {
    "llava-84-14": lambda: tiny_llava(image_size=84, patch_size=14, text_layers=2),
    "llava_next-42-14": lambda: tiny_llava_next(image_size=42, patch_size=14, text_layers=2),
    "internvl-48-8": lambda: tiny_internvl(tile_size=48, patch_size=8, max_patches=4, text_layers=2),
    # anyres_max_1: every grid over one base grid's patches is down-sampled (anchor rows)
    "onevision-42-14-max1": lambda: tiny_llava_onevision(image_size=42, patch_size=14, text_layers=2,
                                                         vision_aspect_ratio="anyres_max_1"),
    "qwen2_5_vl-14": lambda: tiny_qwen2_5_vl(patch_size=14, window_size=56, text_layers=2, max_tokens=40),
}
SIZES = [(130, 60), (50, 90), (200, 200), (300, 80), (40, 40)]  # (w, h)
_CACHE: dict = {}


def _model(name):
    if name not in _CACHE:
        _CACHE[name] = MODELS[name]()
    return _CACHE[name]


def _image(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("name", list(MODELS))
def test_layout_matches_the_model(name, size):
    """As many positions as the model's visual rows, as many crops as HiRED's budgets, and HiRED's kept indices
    fall on the crops its ``crop_kept`` says (so the position -> crop map is the model's)."""
    model, processor = _model(name)
    image = _image(*size)
    layout = token_layout(model.config, processor, size)
    inputs = processor(images=image, text=build_prompt(processor, "what is it ?"), return_tensors="pt")
    n_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with vlmdrop.dropping(model, "hired", budget=0.3) as handle, torch.no_grad():
        model(**inputs)
    st = handle.stats.images[0]
    assert len(layout) == st.n_before == n_placeholders
    assert len(layout.crops) == len(st.crop_budgets) == len(layout.crop_names)
    per_crop = [0] * len(layout.crops)
    for i in st.kept_indices.tolist():
        assert layout.crop_of[i] >= 0, f"kept position {i} is a newline row"
        per_crop[layout.crop_of[i]] += 1
    assert per_crop == st.crop_kept
    w, h = size
    for i, box in enumerate(layout.boxes):  # every box inside the image and inside its crop's region
        if box is None:
            assert layout.crop_of[i] == layout.panel_of[i] == -1
            continue
        panel, (x0, y0, x1, y1) = layout.crops[layout.crop_of[i]]
        assert layout.panel_of[i] == panel
        assert 0 <= box[0] < box[2] <= w + 1e-6 and 0 <= box[1] < box[3] <= h + 1e-6
        assert x0 - 1e-6 <= box[0] and box[2] <= x1 + 1e-6 and y0 - 1e-6 <= box[1] and box[3] <= y1 + 1e-6


def test_internvl_tiles_then_thumbnail():
    model, processor = _model("internvl-48-8")
    layout = token_layout(model.config, processor, (300, 80))  # wide: several tiles, then the thumbnail
    assert layout.crop_names[-1] == "thumb" and len(layout.crops) > 2
    assert layout.crops[-1] == (1, (0.0, 0.0, 300.0, 80.0))
    assert layout.crop_of[-1] == len(layout.crops) - 1 and layout.crop_of[0] == 0
    assert len(layout) == 9 * len(layout.crops)  # 48 px tiles of 8 px patches, pixel shuffle 0.5: 3 x 3


def test_unknown_model_type_is_named():
    class Config:
        model_type = "gemma3"

    with pytest.raises(ValueError, match="gemma3"):
        token_layout(Config(), object(), (10, 10))


def test_kept_picture_brightens_kept_and_dims_dropped():
    model, processor = _model("llava-84-14")
    image = Image.new("RGB", (240, 240), (200, 160, 120))  # LLaVA-1.5: one 6 x 6 grid of 40 px boxes
    layout = token_layout(model.config, processor, image.size)
    kept, merged = [0, 7, 35], [[20, 21]]
    pic = np.asarray(kept_picture(image, layout, kept, merged, max_side=240))
    title = pic.shape[0] - 240
    for i, box in enumerate(layout.boxes):
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2) + title
        want = (200, 160, 120) if i in kept or i in merged[0] else tuple(int(v * DIM) for v in (200, 160, 120))
        assert tuple(pic[cy, cx]) == want, i
    with pytest.raises(ValueError, match="36"):
        kept_picture(image, layout, [36])


def test_kept_picture_panels_side_by_side():
    model, processor = _model("llava_next-42-14")
    layout = token_layout(model.config, processor, (130, 60))
    assert len(layout.panels) == 2
    pic = kept_picture(_image(130, 60), layout, [0], max_side=130)
    assert pic.width == 2 * 130 + 8


def test_bar_chart_checks_lengths():
    assert bar_chart([3, 5], ["a", "b"], title="t", caps=[4, 9]).size == (420, 200)
    with pytest.raises(ValueError, match="2 values, 3 labels"):
        bar_chart([3, 5], ["a", "b", "c"], title="t")


def test_onevision_down_sampled_rows_are_anchors():
    model, processor = _model("onevision-42-14-max1")
    layout = token_layout(model.config, processor, (200, 200))  # a 3x3 grid of 3x3 patches, down-sampled
    assert "down-sampled" in layout.panels[1]
    inputs = processor(images=_image(200, 200), text=build_prompt(processor, "what is it ?"), return_tensors="pt")
    assert len(layout) == int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = layout.boxes[9:]  # after the 3x3 base image: 9x9 unpadded patches, ratio 3 > 1.1 -> 3x3 (+ newlines)
    assert len(grid) == 3 * 4 and grid.count(None) == 3
    # each anchor is the patch nearest its sample point (src = 3i + 1): rows and columns 1, 4, 7 of the full grid
    from vlmdrop.demo.layout import _llava_next

    full = _llava_next(model.config, processor.image_processor, 200, 200, crop=42).boxes[9:]  # rows of 9 + newline
    assert [grid[4 * i + j] for i in range(3) for j in range(3)] == [full[10 * r + c] for r in (1, 4, 7)
                                                                      for c in (1, 4, 7)]
