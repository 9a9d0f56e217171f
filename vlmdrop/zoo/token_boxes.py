"""Where on the canvas each LLaVA-NeXT visual position looks: a pixel box per position.

Follows transformers' ``LlavaNextModel.pack_image_features`` with ``vision_feature_select_strategy
="default"`` and the ``spatial_unpad`` layout: the base image's ``g x g`` tokens first (the whole
canvas squashed to one tile), then the AnyRes grid's feature rows, unpadded to the canvas' aspect
ratio, each row followed by one ``image_newline`` position (box ``None``).
"""

from __future__ import annotations

import math

from transformers.image_processing_utils import select_best_resolution

__all__ = ["anyres_layout", "token_boxes", "boxes_touch"]

Box = tuple[float, float, float, float]


def anyres_layout(image_size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int, int, int, int, int]:
    """``(tw, th, nw, nh, px, py)`` of an image of ``image_size = (w, h)``: the best pinpoint, the size the
    image processor resizes the image to inside it (aspect preserved, as ``get_patch_output_size``) and
    the centred zero padding around it."""
    w, h = image_size
    th, tw = select_best_resolution((h, w), pinpoints)
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nh, nw = th, min(math.ceil(w * sh), tw)
    return tw, th, nw, nh, (tw - nw) // 2, (th - nh) // 2


def token_boxes(image_size: tuple[int, int], pinpoints: list[list[int]], crop: int, patch: int) -> list[Box | None]:
    """Canvas boxes ``(x0, y0, x1, y1)`` of the visual positions of an image of ``image_size = (w, h)``.

    Newline positions get ``None``.  ``len(result)`` equals the number of ``<image>`` placeholders the
    processor emits for that image.
    """
    w, h = image_size
    if crop % patch:
        raise ValueError(f"crop {crop} is not a multiple of patch {patch}")
    g = crop // patch
    boxes: list[Box | None] = []
    for r in range(g):  # base image: the canvas squashed to crop x crop
        for c in range(g):
            boxes.append((c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g))
    tw, th, nw, nh, px, py = anyres_layout((w, h), pinpoints)
    rows, cols = th // crop * g, tw // crop * g  # feature grid before unpadding
    # model's unpad_image on the (rows, cols) feature grid, with the original (h, w)
    r0, r1, c0, c1 = 0, rows, 0, cols
    if w / h > cols / rows:
        new_h = int(round(h * (cols / w), 7))
        pad = (rows - new_h) // 2
        r0, r1 = pad, rows - pad
    else:
        new_w = int(round(w * (rows / h), 7))
        pad = (cols - new_w) // 2
        c0, c1 = pad, cols - pad
    for r in range(r0, r1):
        for c in range(c0, c1):
            x0, y0 = (c * patch - px) * w / nw, (r * patch - py) * h / nh
            x1, y1 = ((c + 1) * patch - px) * w / nw, ((r + 1) * patch - py) * h / nh
            boxes.append((max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)))
        boxes.append(None)
    return boxes


def boxes_touch(a: Box, b: Box) -> bool:
    """Whether two boxes overlap with positive area."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
