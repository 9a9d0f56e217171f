"""Task "easyvqa-hr": easy-VQA shapes pasted small onto large, cluttered canvases.

Each sample takes one question of the ``easy-vqa`` package (MIT; 64x64 images of one
coloured shape) and builds a high-resolution composite: a canvas of one of
:data:`CANVAS_SIZES` (several aspect ratios, so LLaVA-NeXT's AnyRes picks different
grids) with a grey noise texture and grey clutter, on which the easy-VQA shape, cut out
of its own 64x64 image, is pasted at a random position, rescaled so that its bounding
box covers a target fraction drawn from [:data:`MIN_AREA_FRACTION`,
:data:`MAX_AREA_FRACTION`] of the canvas and never more than the maximum.

Rules (see also NOTES-easyvqa.md):

* Splits are easy-VQA's own ``train`` / ``test`` (disjoint image files and questions).
* Question order is balanced in blocks of 12 samples: 4 shape, 4 color and 4 yes/no
  questions, the yes/no ones being one of each (answer, negated) cell:
  (yes, plain), (yes, "not"/"no"), (no, plain), (no, "not"/"no"); slots are shuffled
  within each block.  Shape answers cycle through all 3 shapes and color answers
  through all 8 colors in seeded random order, so every answer is equally frequent.
  No question is used twice; ``n=None`` means the longest such stream.
* Background and clutter never come close to an answer color: every pixel that is not
  the shape is at least :data:`MIN_DISTRACTOR_DISTANCE` (Euclidean RGB) away from all
  of :data:`ANSWER_COLORS`.  Clutter is thin dark-grey polylines and light-grey jagged
  blobs (9 to 14 vertices), never a solid circle, rectangle or triangle.
* Everything is derived from ``numpy.random.Generator(PCG64(SeedSequence([...])))``
  keyed on (seed, split, sample index), never from global state; sample ``i`` does not
  depend on ``n``, so a shorter run is a prefix of a longer one.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWER_COLORS",
    "CANVAS_SIZES",
    "MAX_AREA_FRACTION",
    "MIN_AREA_FRACTION",
    "MIN_DISTRACTOR_DISTANCE",
    "QTYPES",
    "SHAPES",
    "SPLITS",
    "easyvqa_hr",
    "easyvqa_hr_max_n",
    "easyvqa_hr_qtype_index",
    "easyvqa_hr_records",
]

SPLITS: tuple[str, ...] = ("train", "test")

#: Canvas sizes as (width, height).  The first five are LLaVA-NeXT's AnyRes grids
#: (1x2, 2x1, 2x2, 3x1, 1x3 tiles of 336); the last two are off-grid portrait/landscape.
CANVAS_SIZES: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
    (500, 700),
    (700, 500),
)

#: The scaled cut-out targets a fraction of the canvas area drawn uniformly from
#: [MIN_AREA_FRACTION, MAX_AREA_FRACTION]; its tight bbox never exceeds the maximum
#: (it can fall below the minimum once the soft edge is trimmed).
MIN_AREA_FRACTION: float = 0.01
MAX_AREA_FRACTION: float = 0.02

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")

#: easy-VQA's 8 color answers and the exact RGB value its images use for each.
ANSWER_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "green": (0, 255, 0),
    "red": (255, 0, 0),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
}

QTYPES: tuple[str, ...] = ("shape", "color", "yes_no")

#: Minimum Euclidean RGB distance between any background/clutter pixel and every
#: answer color.
MIN_DISTRACTOR_DISTANCE: float = 48.0

# Grey levels (before a per-sample tint of at most +-_TINT per channel).
_TEXTURE_RANGE = (164, 246)  # light noise texture
_DARK_CLUTTER = (48, 84)  # thin scribbles
_LIGHT_CLUTTER = (170, 240)  # blobs
_TINT = 6
_MARGIN = 4  # pixels kept free between the shape and the canvas border

_BLOCK = 12  # 4 shape + 4 color + 4 yes/no (one per (answer, negated) cell)
_YESNO_CELLS: tuple[tuple[str, bool], ...] = (
    ("yes", False),
    ("yes", True),
    ("no", False),
    ("no", True),
)
# Slot codes inside a block: 0 shape, 1 color, 2..5 yes/no cell 0..3.
_BLOCK_SLOTS: tuple[int, ...] = (0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5)

# Stream keys for SeedSequence (purpose codes).
_K_POOL, _K_BLOCK, _K_SHAPE_CYCLE, _K_COLOR_CYCLE, _K_RENDER = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------- source


@dataclass(frozen=True)
class _Question:
    text: str
    answer: str
    image_id: int
    index: int  # position in easy-VQA's questions.json of the split


@dataclass(frozen=True)
class _Split:
    name: str
    image_paths: dict[int, str]
    shapes: dict[int, str]  # eligible images only
    colors_from_questions: dict[int, str]
    shape_pools: dict[str, tuple[_Question, ...]]
    color_pools: dict[str, tuple[_Question, ...]]
    yesno_pools: tuple[tuple[_Question, ...], ...]  # indexed like _YESNO_CELLS


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _is_negated(text: str) -> bool:
    words = _words(text)
    return "not" in words or "no" in words


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    return split


@functools.lru_cache(maxsize=None)
def _load_split(split: str) -> _Split:
    """Read easy-VQA's questions of ``split`` and sort them into answer pools.

    An image is eligible when its own questions pin down its shape: a shape answer, a
    shape word in a non-yes/no question ("what color is the triangle?"), a yes/no
    question that asserts a shape, or two shapes denied.  Only questions on eligible
    images enter the pools.
    """
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("task 'easyvqa-hr' needs the 'easy-vqa' package: pip install easy-vqa") from exc

    answers = set(easy_vqa.get_answers())
    expected = set(SHAPES) | set(ANSWER_COLORS) | {"yes", "no"}
    if answers != expected:
        raise RuntimeError(f"easy-vqa answers {sorted(answers)} differ from the expected {sorted(expected)}")
    if split == "train":
        texts, answer_list, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        texts, answer_list, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()

    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    colors: dict[int, set[str]] = {}
    questions = [_Question(t, a, int(i), k) for k, (t, a, i) in enumerate(zip(texts, answer_list, image_ids))]
    for q in questions:
        words = _words(q.text)
        if q.answer in ("yes", "no"):
            mentioned = [w for w in words if w in SHAPES or w in ANSWER_COLORS]
            if len(mentioned) != 1:
                raise RuntimeError(f"cannot parse easy-VQA yes/no question {q.text!r} (index {q.index})")
            truth = (q.answer == "yes") != _is_negated(q.text)
            word = mentioned[0]
            if word in SHAPES:
                (present if truth else absent).setdefault(q.image_id, set()).add(word)
            elif truth:
                colors.setdefault(q.image_id, set()).add(word)
            continue
        for w in [*words, q.answer]:
            if w in SHAPES:
                present.setdefault(q.image_id, set()).add(w)
            elif w in ANSWER_COLORS:
                colors.setdefault(q.image_id, set()).add(w)

    shapes: dict[int, str] = {}
    for image_id in image_paths:
        pos = present.get(image_id, set())
        neg = absent.get(image_id, set())
        if pos & neg or len(pos) > 1:
            continue
        candidates = pos if pos else set(SHAPES) - neg
        if len(candidates) == 1:
            shapes[image_id] = next(iter(candidates))
    colors_from_questions = {i: next(iter(c)) for i, c in colors.items() if len(c) == 1}

    shape_pools: dict[str, list[_Question]] = {s: [] for s in SHAPES}
    color_pools: dict[str, list[_Question]] = {c: [] for c in ANSWER_COLORS}
    yesno_pools: list[list[_Question]] = [[] for _ in _YESNO_CELLS]
    for q in questions:
        if q.image_id not in shapes or q.image_id not in image_paths:
            continue
        if q.answer in SHAPES:
            shape_pools[q.answer].append(q)
        elif q.answer in ANSWER_COLORS:
            color_pools[q.answer].append(q)
        else:
            yesno_pools[_YESNO_CELLS.index((q.answer, _is_negated(q.text)))].append(q)
    return _Split(
        name=split,
        image_paths=dict(image_paths),
        shapes=shapes,
        colors_from_questions=colors_from_questions,
        shape_pools={k: tuple(v) for k, v in shape_pools.items()},
        color_pools={k: tuple(v) for k, v in color_pools.items()},
        yesno_pools=tuple(tuple(v) for v in yesno_pools),
    )


# --------------------------------------------------------------------------- plan


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(keys))))


def _split_code(split: str) -> int:
    return SPLITS.index(split)


def _max_blocks(src: _Split) -> int:
    # Block b uses yes/no cell questions number b; shape slot k uses cycle k // 3 of the
    # shape pools, color slot k cycle k // 8: B blocks need 4B <= 3*min(shape pool)
    # and 4B <= 8*min(color pool).
    min_cell = min(len(p) for p in src.yesno_pools)
    min_shape = min(len(p) for p in src.shape_pools.values())
    min_color = min(len(p) for p in src.color_pools.values())
    return min(min_cell, (3 * min_shape) // 4, 2 * min_color)


def easyvqa_hr_max_n(split: str) -> int:
    """Longest balanced stream of ``split`` without a repeated question (what ``n=None`` gives)."""
    return _BLOCK * _max_blocks(_load_split(_check_split(split)))


class _Planner:
    """Maps sample index -> easy-VQA question, following the balance rule."""

    def __init__(self, src: _Split, seed: int) -> None:
        self._src = src
        self._seed = seed
        code = _split_code(src.name)
        self._code = code

        def perm(pool: tuple[_Question, ...], *key: int) -> tuple[_Question, ...]:
            order = _rng(seed, code, _K_POOL, *key).permutation(len(pool))
            return tuple(pool[int(j)] for j in order)

        self._shape = {s: perm(src.shape_pools[s], 0, k) for k, s in enumerate(SHAPES)}
        colors = tuple(ANSWER_COLORS)
        self._color = {c: perm(src.color_pools[c], 1, k) for k, c in enumerate(colors)}
        self._yesno = tuple(perm(p, 2, k) for k, p in enumerate(src.yesno_pools))

    def _block(self, b: int) -> tuple[int, ...]:
        order = _rng(self._seed, self._code, _K_BLOCK, b).permutation(_BLOCK)
        return tuple(_BLOCK_SLOTS[int(j)] for j in order)

    def question(self, i: int) -> tuple[_Question, str]:
        b, r = divmod(i, _BLOCK)
        slots = self._block(b)
        slot = slots[r]
        if slot >= 2:
            return self._yesno[slot - 2][b], "yes_no"
        rank = sum(1 for s in slots[:r] if s == slot)
        k = 4 * b + rank
        if slot == 0:
            cycle, pos = divmod(k, len(SHAPES))
            order = _rng(self._seed, self._code, _K_SHAPE_CYCLE, cycle).permutation(len(SHAPES))
            answer = SHAPES[int(order[pos])]
            return self._shape[answer][cycle], "shape"
        colors = tuple(ANSWER_COLORS)
        cycle, pos = divmod(k, len(colors))
        order = _rng(self._seed, self._code, _K_COLOR_CYCLE, cycle).permutation(len(colors))
        answer = colors[int(order[pos])]
        return self._color[answer][cycle], "color"


# --------------------------------------------------------------------------- rendering


def _bilinear(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a 2-D float array with pixel-centre bilinear sampling (edges clamped)."""
    in_h, in_w = arr.shape
    ys = (np.arange(out_h, dtype=np.float64) + 0.5) * (in_h / out_h) - 0.5
    xs = (np.arange(out_w, dtype=np.float64) + 0.5) * (in_w / out_w) - 0.5
    ys = np.clip(ys, 0.0, in_h - 1.0)
    xs = np.clip(xs, 0.0, in_w - 1.0)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, in_h - 1)
    x1 = np.minimum(x0 + 1, in_w - 1)
    fx = (xs - x0)[None, :]
    fy = (ys - y0)[:, None]
    rows = arr[:, x0] * (1.0 - fx) + arr[:, x1] * fx  # separable: along x first
    return rows[y0] * (1.0 - fy) + rows[y1] * fy


def _blur3(arr: np.ndarray) -> np.ndarray:
    """Separable [1/4, 1/2, 1/4] blur of a 2-D float array (edges clamped)."""
    p = np.pad(arr, 1, mode="edge")
    rows = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    return 0.25 * rows[:-2] + 0.5 * rows[1:-1] + 0.25 * rows[2:]


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth float32 noise in [-1, 1]: a random grid of ``cell``-pixel spacing, bilinearly interpolated."""
    grid = rng.uniform(-1.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) / np.float32(cell)
    xs = np.arange(w, dtype=np.float32) / np.float32(cell)
    y0 = ys.astype(np.int64)
    x0 = xs.astype(np.int64)
    fy = (ys - y0.astype(np.float32))[:, None]
    fx = (xs - x0.astype(np.float32))[None, :]
    rows = grid[:, x0] * (np.float32(1.0) - fx) + grid[:, x0 + 1] * fx
    return rows[y0] * (np.float32(1.0) - fy) + rows[y0 + 1] * fy


def _grey(rng: np.random.Generator, band: tuple[int, int], tint: np.ndarray) -> tuple[int, int, int]:
    g = int(rng.integers(band[0], band[1] + 1))
    r, gg, b = (int(np.clip(g + t, 0, 255)) for t in tint)
    return (r, gg, b)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    tint = rng.integers(-_TINT, _TINT + 1, size=3)
    base = float(rng.integers(190, 221))
    coarse = _value_noise(rng, h, w, int(rng.integers(48, 129)))
    fine = _value_noise(rng, h, w, int(rng.integers(10, 25)))
    grain = rng.integers(-4, 5, size=(h, w), dtype=np.int16).astype(np.float32)
    value = np.float32(base) + np.float32(18.0) * coarse + np.float32(7.0) * fine + grain
    value = np.clip(np.floor(value + np.float32(0.5)), _TEXTURE_RANGE[0], _TEXTURE_RANGE[1]).astype(np.int16)
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        rgb[:, :, c] = np.clip(value + int(tint[c]), 0, 255)
    image = Image.fromarray(rgb, "RGB")

    draw = ImageDraw.Draw(image)
    scale = math.sqrt(w * h / (672 * 672))
    for _ in range(int(rng.integers(3, 9) * scale) + 2):  # light jagged blobs
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        radius = float(rng.uniform(12, 70))
        k = int(rng.integers(9, 15))
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=k))
        radii = radius * rng.uniform(0.45, 1.0, size=k)
        pts = [(cx + float(r) * math.cos(a), cy + float(r) * math.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(pts, fill=_grey(rng, _LIGHT_CLUTTER, tint))
    for _ in range(int(rng.integers(10, 25) * scale) + 2):  # thin dark scribbles
        k = int(rng.integers(2, 6))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        pts = [(x, y)]
        for _ in range(k - 1):
            x += float(rng.uniform(-90, 90))
            y += float(rng.uniform(-90, 90))
            pts.append((x, y))
        draw.line(pts, fill=_grey(rng, _DARK_CLUTTER, tint), width=int(rng.integers(1, 4)))
    return image


def _cut_out(path: str) -> tuple[np.ndarray, str]:
    """Alpha matte (float in [0, 1], cropped to the shape) and color name of an easy-VQA image.

    The image's background is one flat light color (its most frequent pixel) and the
    shape one exact answer color (the answer color with the most exact pixels), with
    anti-aliased edges in between; alpha is the projection of each pixel onto the
    background -> shape-color segment.
    """
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    flat = rgb.reshape(-1, 3)
    names = tuple(ANSWER_COLORS)
    counts = [int(np.all(flat == np.array(ANSWER_COLORS[c]), axis=1).sum()) for c in names]
    color = names[int(np.argmax(counts))]
    if max(counts) == 0:
        raise RuntimeError(f"easy-VQA image {path!r} holds no exact answer color")
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    values, freq = np.unique(packed, return_counts=True)
    bgp = int(values[int(np.argmax(freq))])
    bg = np.array([(bgp >> 16) & 255, (bgp >> 8) & 255, bgp & 255], dtype=np.float64)
    fg = np.array(ANSWER_COLORS[color], dtype=np.float64)
    v = fg - bg
    alpha = np.clip(((rgb.astype(np.float64) - bg) @ v) / float(v @ v), 0.0, 1.0)
    ys, xs = np.nonzero(alpha > 0.02)
    return alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], color


def _matte_at(alpha: np.ndarray, s: float) -> np.ndarray:
    """Matte scaled by ``s``, quantised to 0..255 and cropped to its non-zero pixels."""
    if s > 1.5:
        # Smooth the 1-px anti-aliased source edge first, so the upscaled contour is
        # round instead of stepped (padding keeps the blur inside the matte), then
        # sharpen the edge back to about one output pixel.
        src = _blur3(np.pad(alpha, 1))
        sharpen = 1.5 * s
    else:
        src = alpha
        sharpen = 1.0
    out_h = max(1, int(src.shape[0] * s))
    out_w = max(1, int(src.shape[1] * s))
    scaled = np.clip((_bilinear(src, out_h, out_w) - 0.5) * sharpen + 0.5, 0.0, 1.0)
    a8 = np.floor(scaled * 255.0 + 0.5).astype(np.int64)
    ys, xs = np.nonzero(a8)
    return a8[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _scale_matte(alpha: np.ndarray, target_area: float, max_area: float) -> np.ndarray:
    """Scale the cut-out so its tight box covers about ``target_area`` and never more than ``max_area``."""
    s = math.sqrt(target_area / (alpha.shape[0] * alpha.shape[1]))
    a8 = _matte_at(alpha, s)
    for _ in range(20):
        area = a8.shape[0] * a8.shape[1]
        if area <= max_area:
            return a8
        s *= 0.99 * math.sqrt(max_area / area)
        a8 = _matte_at(alpha, s)
    raise RuntimeError(f"cannot fit a {alpha.shape} cut-out into {max_area:.0f} pixels")


def _render(src: _Split, q: _Question, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int], str]:
    w, h = CANVAS_SIZES[int(rng.integers(len(CANVAS_SIZES)))]
    canvas = _background(rng, w, h)

    alpha, color = _cut_out(src.image_paths[q.image_id])
    qcolor = src.colors_from_questions.get(q.image_id)
    if qcolor is not None and qcolor != color:
        raise RuntimeError(
            f"easy-VQA image {q.image_id} of split {src.name!r}: pixels say {color!r}, questions say {qcolor!r}"
        )
    fraction = float(rng.uniform(MIN_AREA_FRACTION, MAX_AREA_FRACTION))
    a8 = _scale_matte(alpha, fraction * w * h, MAX_AREA_FRACTION * w * h)
    nh, nw = a8.shape

    x0 = int(rng.integers(_MARGIN, w - nw - _MARGIN + 1))
    y0 = int(rng.integers(_MARGIN, h - nh - _MARGIN + 1))
    box = (x0, y0, x0 + nw, y0 + nh)
    patch = np.asarray(canvas.crop(box), dtype=np.int64)
    fg = np.array(ANSWER_COLORS[color], dtype=np.int64)
    a = a8[:, :, None]
    blended = (patch * (255 - a) + fg * a + 127) // 255
    canvas.paste(Image.fromarray(blended.astype(np.uint8), "RGB"), (x0, y0))
    return canvas, box, color


# --------------------------------------------------------------------------- public API


def easyvqa_hr_qtype_index(split: str, seed: int, k: int, *, qtypes: Sequence[str],
                           negated: bool | None = None) -> int:
    """Stream index of the ``k``-th sample (0-based) whose ``qtype`` is in ``qtypes``, wrapping around the stream.

    ``negated`` (``True`` / ``False``) keeps only the yes/no questions with / without "not"/"no" (shape and
    colour questions are never negated).  Cheap (no rendering): every block of 12 samples holds 4 of each type
    (2 yes/no per negation), so the ``k``-th one lies in a known block.  Feed the index to
    :func:`easyvqa_hr_records` as ``start`` to render it.  Raises ``ValueError`` for an unknown type, a
    ``negated`` filter without ``"yes_no"`` in ``qtypes``, or a negative ``k``.
    """
    wanted = set(qtypes)
    if not wanted or not wanted <= set(QTYPES):
        raise ValueError(f"qtypes must be a non-empty subset of {QTYPES}, got {tuple(qtypes)!r}")
    if negated is not None and "yes_no" not in wanted:
        raise ValueError(f"negated={negated!r} filters yes/no questions, but qtypes={tuple(qtypes)!r} has none")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    src, _ = _check_args(split, seed, 0)
    codes = {0} if "shape" in wanted else set()
    codes |= {1} if "color" in wanted else set()
    if "yes_no" in wanted:
        codes |= {2 + c for c, (_, neg) in enumerate(_YESNO_CELLS) if negated is None or neg == negated}
    per_block = sum(1 for slot in _BLOCK_SLOTS if slot in codes)
    b, r = divmod(int(k), per_block)
    b %= _max_blocks(src)
    slots = _Planner(src, int(seed))._block(b)
    hits = [pos for pos, slot in enumerate(slots) if slot in codes]
    return b * _BLOCK + hits[r]


def _check_args(split: str, seed: int, n: int | None) -> tuple[_Split, int]:
    _check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    src = _load_split(split)
    limit = _BLOCK * _max_blocks(src)
    if n is None:
        return src, limit
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    if n > limit:
        raise ValueError(f"n={n} exceeds the {limit} balanced samples of split {split!r} (no question repeated)")
    return src, int(n)


def easyvqa_hr_records(
    split: str, seed: int = 0, n: int | None = None, *, start: int = 0
) -> Iterator[dict[str, Any]]:
    """Yield the samples of task "easyvqa-hr" as dicts.

    Keys: ``id`` (str, unique per split/seed/index), ``image`` (RGB ``PIL.Image`` of a
    size in :data:`CANVAS_SIZES`), ``question``, ``answer`` (easy-VQA's own text),
    ``qtype`` (one of :data:`QTYPES`), ``bbox`` (``(x0, y0, x1, y1)``, end-exclusive
    pixel box of every pixel the shape touches), ``shape`` and ``color`` (what is
    drawn), ``source`` (``"<split>/<image id>"`` of the easy-VQA image) and
    ``source_question`` (index into easy-VQA's questions.json of the split).

    ``n=None`` yields :func:`easyvqa_hr_max_n` samples.  ``start`` skips to sample
    ``start`` without rendering the ones before it (samples ``start .. n-1``; random access
    for resumable training).  Raises ``ValueError`` for an unknown split, a negative seed,
    ``n`` beyond that maximum, or a negative ``start``.
    """
    src, count = _check_args(split, seed, n)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    planner = _Planner(src, int(seed))
    code = _split_code(split)
    for i in range(int(start), count):
        q, qtype = planner.question(i)
        image, bbox, color = _render(src, q, _rng(int(seed), code, _K_RENDER, i))
        yield {
            "id": f"easyvqa-hr/{split}/{int(seed)}/{i:06d}",
            "image": image,
            "question": q.text,
            "answer": q.answer,
            "qtype": qtype,
            "bbox": bbox,
            "shape": src.shapes[q.image_id],
            "color": color,
            "source": f"{split}/{q.image_id}",
            "source_question": q.index,
        }


def easyvqa_hr(split: str, seed: int = 0, n: int | None = None) -> Iterator[tuple[Image.Image, str, str]]:
    """Yield ``(image, question, answer)`` of task "easyvqa-hr"; see :func:`easyvqa_hr_records`."""
    for record in easyvqa_hr_records(split, seed=seed, n=n):
        yield record["image"], record["question"], record["answer"]
