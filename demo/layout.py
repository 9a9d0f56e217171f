"""Where each visual position of a supported VLM looks in the picture, and the pictures the demo draws.

Pure functions (no model, no Gradio): :func:`token_layout` reads the model's config and the processor's settings
and returns, for an image of a given size, one box per visual position (in the original image's pixels, in the
order of ``ImageStats.kept_indices``), the crop each position belongs to and the crops' regions, arranged on
panels (LLaVA-NeXT: the base image, then the AnyRes sub-images; InternVL: the tiles, then the thumbnail;
LLaVA-1.5: the one centre crop). :func:`kept_picture` highlights the kept positions of one ``ImageStats`` on those
panels (dropped ones dimmed, merged or pooled rows outlined as the regions they summarise, the crop / tile grid
drawn); :func:`bar_chart` draws per-crop budgets and per-layer token counts.

LLaVA-NeXT boxes come from :func:`vlmdrop.zoo.token_boxes.token_boxes` (the model's ``pack_image_features``
with unpadding and newline rows); InternVL follows the image processor's ``crop_to_patches`` (tiles of the
grid ``get_optimal_tiled_canvas`` picks, raster order, thumbnail last when there is more than one tile) and the
post-``pixel_shuffle`` raster order of each tile's tokens; LLaVA-1.5 follows CLIP's resize-then-centre-crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw

from vlmdrop.zoo.token_boxes import anyres_layout, token_boxes

__all__ = ["TokenLayout", "bar_chart", "kept_picture", "token_layout"]

Box = tuple[float, float, float, float]

#: Colours of the picture: kept patches' outline, crop grid, merged / pooled regions (cycled), dropped dimming.
KEPT_OUTLINE = (255, 215, 0)
GRID = (0, 170, 255)
GROUP_COLOURS = ((255, 64, 160), (64, 220, 120), (255, 140, 0), (160, 100, 255), (0, 200, 220))
DIM = 0.25  # brightness of a dropped patch


@dataclass(frozen=True)
class TokenLayout:
    """The visual positions of one image, in the order the model feeds them to the LLM.

    boxes: per position, its box ``(x0, y0, x1, y1)`` in the original image's pixels; ``None`` for a
        LLaVA-NeXT newline row (no picture content).
    panel_of: per position, the panel it is drawn on (-1 for a newline row).
    crop_of: per position, its crop in ``ImageStats.crop_budgets`` order (-1 for a newline row).
    panels: the panels' titles.
    crops: per crop, ``(panel, region)``: the part of the original image the crop covers.
    crop_names: per crop, a short label (``"base"``, ``"sub 1"``, ``"tile 3"``, ``"thumb"``).
    """

    boxes: tuple[Box | None, ...]
    panel_of: tuple[int, ...]
    crop_of: tuple[int, ...]
    panels: tuple[str, ...]
    crops: tuple[tuple[int, Box], ...]
    crop_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.boxes)


def _size(d: Any, *keys: str) -> int | None:
    """``d[key]`` for the first key present (image processors keep sizes as dicts or SizeDicts)."""
    for k in keys:
        v = d.get(k) if isinstance(d, dict) else getattr(d, k, None)
        if v is not None:
            return int(v)
    return None


def token_layout(config: Any, processor: Any, image_size: tuple[int, int]) -> TokenLayout:
    """The :class:`TokenLayout` of an image of ``image_size = (w, h)`` for a model of ``config`` (its
    ``model_type``: ``llava``, ``llava_next``, ``llava_onevision``, ``internvl``, ``qwen2_5_vl``, ``qwen3_vl`` or
    ``qwen3_5``) fed by ``processor``.

    ValueError naming the model type when it is none of those.
    """
    w, h = (int(v) for v in image_size)
    if w < 1 or h < 1:
        raise ValueError(f"image_size={image_size!r} must be two positive ints (w, h)")
    kind = getattr(config, "model_type", None)
    if kind == "llava_next":
        return _llava_next(config, processor.image_processor, w, h)
    if kind == "llava_onevision":
        return _llava_onevision(config, processor.image_processor, w, h)
    if kind == "llava":
        return _llava(config, processor.image_processor, w, h)
    if kind == "internvl":
        return _internvl(config, processor, w, h)
    if kind in ("qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        return _qwen(config, processor.image_processor, w, h)
    raise ValueError(f"model_type={kind!r}: no token layout (supported: llava, llava_next, llava_onevision, "
                     "internvl, qwen2_5_vl, qwen3_vl, qwen3_5)")


def _llava(config: Any, ip: Any, w: int, h: int) -> TokenLayout:
    patch = int(config.vision_config.patch_size)
    crop = _size(ip.crop_size, "height") if getattr(ip, "do_center_crop", False) else None
    short = _size(ip.size, "shortest_edge")
    if crop is not None and short is not None:  # resize the short side to `short`, then a centred crop
        s = short / min(w, h)
        side = crop / s
        x0, y0 = (w - side) / 2, (h - side) / 2
        region = (max(0.0, x0), max(0.0, y0), min(float(w), x0 + side), min(float(h), y0 + side))
        side_px = crop
    else:  # resized to a fixed square: the whole image
        side_px = _size(ip.size, "height", "shortest_edge") or int(config.vision_config.image_size)
        region = (0.0, 0.0, float(w), float(h))
    g = side_px // patch
    rx0, ry0, rx1, ry1 = region
    cw, ch = (rx1 - rx0) / g, (ry1 - ry0) / g
    boxes = tuple((rx0 + c * cw, ry0 + r * ch, rx0 + (c + 1) * cw, ry0 + (r + 1) * ch)
                  for r in range(g) for c in range(g))
    n = len(boxes)
    return TokenLayout(boxes, (0,) * n, (0,) * n, (f"image ({g}x{g} patches)",), ((0, region),), ("image",))


def _llava_next(config: Any, ip: Any, w: int, h: int, *, crop: int | None = None) -> TokenLayout:
    patch = int(config.vision_config.patch_size)
    crop = crop or _size(ip.crop_size, "height") or int(config.vision_config.image_size)
    pinpoints = [list(p) for p in (ip.image_grid_pinpoints or config.image_grid_pinpoints)]
    boxes = token_boxes((w, h), pinpoints, crop, patch)
    g2 = (crop // patch) ** 2
    tw, th, nw, nh, px, py = anyres_layout((w, h), pinpoints)
    rows, cols = th // crop, tw // crop

    def to_image(x: float, y: float) -> tuple[float, float]:  # resized-and-padded canvas -> original pixels
        return min(max((x - px) * w / nw, 0.0), float(w)), min(max((y - py) * h / nh, 0.0), float(h))

    crops: list[tuple[int, Box]] = [(0, (0.0, 0.0, float(w), float(h)))]
    for r in range(rows):
        for c in range(cols):
            crops.append((1, (*to_image(c * crop, r * crop), *to_image((c + 1) * crop, (r + 1) * crop))))
    panel_of, crop_of = [], []
    for i, b in enumerate(boxes):
        if b is None:
            panel_of.append(-1)
            crop_of.append(-1)
        elif i < g2:
            panel_of.append(0)
            crop_of.append(0)
        else:  # the sub-image whose tile holds the box's centre (a clipped box keeps its centre inside)
            cx = ((b[0] + b[2]) / 2) * nw / w + px
            cy = ((b[1] + b[3]) / 2) * nh / h + py
            c, r = min(int(cx // crop), cols - 1), min(int(cy // crop), rows - 1)
            panel_of.append(1)
            crop_of.append(1 + r * cols + c)
    names = ("base",) + tuple(f"sub {i}" for i in range(1, rows * cols + 1))
    panels = (f"base image ({crop // patch}x{crop // patch})", f"sub-images ({rows}x{cols} grid, unpadded)")
    return TokenLayout(tuple(boxes), tuple(panel_of), tuple(crop_of), panels, tuple(crops), names)


def _llava_onevision(config: Any, ip: Any, w: int, h: int) -> TokenLayout:
    """LLaVA-NeXT's layout (base image, unpadded AnyRes grid, newline rows), then, where the unpadded grid holds
    more than ``anyres_max_N`` base grids (ratio > 1.1), the model's bilinear down-sampling: each down-sampled
    row is drawn as its anchor, the patch nearest the point it samples (ties to the lower index), the rule the
    adapter uses to give the row its crop (``adapters/llava_onevision.py``)."""
    crop = _size(ip.size, "height", "shortest_edge") or int(config.vision_config.image_size)
    full = _llava_next(config, ip, w, h, crop=crop)
    g2 = (crop // int(config.vision_config.patch_size)) ** 2
    rest = full.boxes[g2:]
    if not rest:
        return full
    cols = rest.index(None)  # the unpadded grid: rows of `cols` boxes, each followed by a newline
    rows = len(rest) // (cols + 1)
    max_n = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_n * g2))
    if ratio <= 1.1:
        return full
    h2, w2 = int(rows // ratio), int(cols // ratio)

    def anchor(i: int, n_in: int, n_out: int) -> int:  # nearest source index of bilinear output i
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        return min(math.ceil(src - 0.5 - 1e-9), n_in - 1)

    picks: list[int | None] = list(range(g2))  # positions of `full` each new position shows (None: newline)
    for i in range(h2):
        r = anchor(i, rows, h2)
        picks.extend(g2 + r * (cols + 1) + anchor(j, cols, w2) for j in range(w2))
        picks.append(None)
    boxes = tuple(None if p is None else full.boxes[p] for p in picks)
    panel_of = tuple(-1 if p is None else full.panel_of[p] for p in picks)
    crop_of = tuple(-1 if p is None else full.crop_of[p] for p in picks)
    panels = (full.panels[0], f"sub-images (unpadded, down-sampled to {h2}x{w2}: anchors shown)")
    return TokenLayout(boxes, panel_of, crop_of, panels, full.crops, full.crop_names)


def _qwen(config: Any, ip: Any, w: int, h: int) -> TokenLayout:
    """Qwen-VL: one crop, the image resized by the processor to a grid of patches; one LLM token per
    ``merge x merge`` patches, in raster order (the merger's output order after the model un-permutes windows).
    The grid is the processor's own (``image_grid_thw`` of a blank image of the same size)."""
    thw = ip(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0].tolist()
    merge = int(getattr(config.vision_config, "spatial_merge_size", 2))
    rows, cols = int(thw[1]) // merge, int(thw[2]) // merge  # the LLM token grid
    cw, ch = w / cols, h / rows
    boxes = tuple((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch) for r in range(rows) for c in range(cols))
    n = len(boxes)
    region = (0.0, 0.0, float(w), float(h))
    return TokenLayout(boxes, (0,) * n, (0,) * n, (f"image ({rows}x{cols} tokens of {merge}x{merge} patches)",),
                       ((0, region),), ("image",))


def _internvl(config: Any, processor: Any, w: int, h: int) -> TokenLayout:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ip = processor.image_processor
    tile = _size(ip.size, "height") or int(config.vision_config.image_size[0])
    per_tile = int(getattr(processor, "image_seq_length", None) or config.image_seq_length)
    q = math.isqrt(per_tile)
    if q * q != per_tile:
        raise ValueError(f"image_seq_length={per_tile} is not a square number of tokens per tile")
    cols, rows = 1, 1
    if getattr(ip, "crop_to_patches", False) and int(ip.max_patches) > 1:
        cols, rows = get_optimal_tiled_canvas((h, w), (tile, tile), int(ip.min_patches), int(ip.max_patches))
    regions: list[tuple[int, Box]] = [(0, (c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows))
                                      for r in range(rows) for c in range(cols)]
    if rows * cols > 1:
        regions.append((1, (0.0, 0.0, float(w), float(h))))  # the thumbnail: the whole image, last
    boxes, panel_of, crop_of = [], [], []
    for k, (panel, (x0, y0, x1, y1)) in enumerate(regions):
        cw, ch = (x1 - x0) / q, (y1 - y0) / q
        for i in range(q):  # post-pixel-shuffle raster order within the tile
            for j in range(q):
                boxes.append((x0 + j * cw, y0 + i * ch, x0 + (j + 1) * cw, y0 + (i + 1) * ch))
                panel_of.append(panel)
                crop_of.append(k)
    names = tuple(f"tile {i}" for i in range(1, rows * cols + 1)) + (("thumb",) if rows * cols > 1 else ())
    panels = (f"tiles ({rows}x{cols} grid, {q}x{q} tokens each)",) + (("thumbnail",) if rows * cols > 1 else ())
    return TokenLayout(tuple(boxes), tuple(panel_of), tuple(crop_of), panels, tuple(regions), names)


# ======================================================================================
# pictures
# ======================================================================================
def _fit(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    s = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), s


def kept_picture(image: Image.Image, layout: TokenLayout, kept_indices: Sequence[int],
                 new_groups: Sequence[Sequence[int]] | None = None, *, max_side: int = 384) -> Image.Image:
    """The layout's panels side by side, each the image with the kept positions' patches bright (outlined),
    the dropped ones dimmed, each merged or pooled row's region (the positions it summarises) bright and
    outlined in its own colour, and the crop / tile grid drawn. Indices outside the layout: ValueError."""
    n = len(layout)
    kept = sorted({int(i) for i in kept_indices})
    groups = [sorted({int(i) for i in g}) for g in (new_groups or [])]
    bad = [i for i in kept + [i for g in groups for i in g] if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices {bad[:5]} are outside the layout's {n} positions")
    base, s = _fit(image, max_side)
    dim = base.point(lambda v: int(v * DIM))
    title_h, gap = 18, 8
    n_panels = len(layout.panels)
    out = Image.new("RGB", (n_panels * base.width + (n_panels - 1) * gap, base.height + title_h), (255, 255, 255))
    draws = []
    for p in range(n_panels):
        panel = dim.copy()
        draws.append((panel, ImageDraw.Draw(panel)))

    def px(b: Box) -> tuple[int, int, int, int]:
        return (round(b[0] * s), round(b[1] * s), max(round(b[0] * s), round(b[2] * s) - 1),
                max(round(b[1] * s), round(b[3] * s) - 1))

    def light(i: int) -> Box | None:
        b, p = layout.boxes[i], layout.panel_of[i]
        if b is None:
            return None
        r = px(b)
        draws[p][0].paste(base.crop((r[0], r[1], r[2] + 1, r[3] + 1)), (r[0], r[1]))
        return b

    for i in kept:
        light(i)
    for i in kept:
        if layout.boxes[i] is not None:
            draws[layout.panel_of[i]][1].rectangle(px(layout.boxes[i]), outline=KEPT_OUTLINE)
    for k, g in enumerate(groups):
        colour = GROUP_COLOURS[k % len(GROUP_COLOURS)]
        for i in g:
            light(i)
        for i in g:
            if layout.boxes[i] is not None:
                draws[layout.panel_of[i]][1].rectangle(px(layout.boxes[i]), outline=colour)
    for panel, region in layout.crops:
        draws[panel][1].rectangle(px(region), outline=GRID, width=2)
    od = ImageDraw.Draw(out)
    for p, (panel, _) in enumerate(draws):
        x = p * (base.width + gap)
        out.paste(panel, (x, title_h))
        od.text((x + 2, 3), layout.panels[p], fill=(0, 0, 0))
    return out


def bar_chart(values: Sequence[int], labels: Sequence[str], *, title: str, caps: Sequence[int] | None = None,
              width: int = 420, height: int = 200) -> Image.Image:
    """A bar chart of ``values`` (one bar per label, the value written above it); with ``caps`` each bar's
    capacity drawn as an outline behind it. Lengths that differ: ValueError naming them."""
    if len(values) != len(labels) or (caps is not None and len(caps) != len(values)):
        raise ValueError(f"bar_chart: {len(values)} values, {len(labels)} labels, "
                         f"{None if caps is None else len(caps)} caps; give one of each per bar")
    out = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.text((6, 26), title, fill=(0, 0, 0))  # below the label Gradio draws in the corner
    top, bottom, left = 56, height - 20, 8
    top_v = max([1, *values, *(caps or [])])
    n = max(1, len(values))
    slot = (width - 2 * left) / n
    bw = max(2, int(slot * 0.7))
    for k, (v, lab) in enumerate(zip(values, labels)):
        x0 = int(left + k * slot + (slot - bw) / 2)
        if caps is not None:
            y = bottom - (bottom - top) * caps[k] / top_v
            d.rectangle((x0, int(y), x0 + bw, bottom), outline=(160, 160, 160))
        y = bottom - (bottom - top) * v / top_v
        d.rectangle((x0, int(y), x0 + bw, bottom), fill=(0, 120, 215))
        d.text((x0, max(top - 12, int(y) - 12)), str(v), fill=(0, 0, 0))
        d.text((x0, bottom + 4), str(lab)[: max(3, int(slot / 6))], fill=(60, 60, 60))
    d.line((left, bottom, width - left, bottom), fill=(0, 0, 0))
    return out
