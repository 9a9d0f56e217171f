"""vlmdrop.zoo.token_boxes: one box per visual position, newlines where pack_image_features puts them."""

import pytest
from PIL import Image

from vlmdrop.zoo.mini import MiniConfig, build_mini_processor
from vlmdrop.zoo.token_boxes import boxes_touch, token_boxes


@pytest.mark.parametrize("size", [(168, 168), (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008),
                                  (500, 700), (700, 500)])
@pytest.mark.parametrize("cfg", [MiniConfig(), MiniConfig(crop=168, patch=24)], ids=["112-16", "168-24"])
def test_one_box_per_placeholder(size, cfg):
    processor = build_mini_processor(cfg)
    ip = processor.image_processor
    ids = processor(images=Image.new("RGB", size), text="<image>", return_tensors="pt")["input_ids"][0]
    n = int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    boxes = token_boxes(size, ip.image_grid_pinpoints, cfg.crop, cfg.patch)
    g2 = (cfg.crop // cfg.patch) ** 2
    assert len(boxes) == n
    assert all(b is not None for b in boxes[:g2])  # base image first, no newline
    assert boxes[-1] is None  # each grid row ends with a newline
    w, h = size
    real = [b for b in boxes[g2:] if b is not None]
    assert min(b[0] for b in real) == 0 and max(b[2] for b in real) == pytest.approx(w, abs=3)
    assert min(b[1] for b in real) == 0 and max(b[3] for b in real) == pytest.approx(h, abs=3)


def test_boxes_touch():
    assert boxes_touch((0, 0, 10, 10), (9, 9, 20, 20))
    assert not boxes_touch((0, 0, 10, 10), (10, 0, 20, 10))
