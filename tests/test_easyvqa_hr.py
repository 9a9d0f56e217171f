"""Tests for the synthetic task "easyvqa-hr" (vlmdrop.zoo.easyvqa_hr)."""

from __future__ import annotations

import collections
import hashlib
import re
from typing import Any

import numpy as np
import pytest

pytest.importorskip("easy_vqa")

from vlmdrop.zoo import easyvqa_hr, easyvqa_hr_records  # noqa: E402
from vlmdrop.zoo.easyvqa_hr import (  # noqa: E402
    ANSWER_COLORS,
    CANVAS_SIZES,
    MAX_AREA_FRACTION,
    MIN_DISTRACTOR_DISTANCE,
    QTYPES,
    SHAPES,
    easyvqa_hr_max_n,
)

N = 300
PALETTE = np.array([ANSWER_COLORS[c] for c in ANSWER_COLORS], dtype=np.int32)
COLOR_NAMES = tuple(ANSWER_COLORS)


@pytest.fixture(scope="module")
def train300() -> list[dict[str, Any]]:
    return list(easyvqa_hr_records("train", seed=0, n=N))


def _nearest_color(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest answer color and its squared distance, per pixel (N x 3 int)."""
    d2 = ((pixels[:, None, :].astype(np.int32) - PALETTE[None, :, :]) ** 2).sum(-1)
    return d2.argmin(1), d2.min(1)


def _fingerprint(recs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (r["id"], r["question"], r["answer"], r["qtype"], r["bbox"], r["image"].size, r["image"].tobytes())
        for r in recs
    ]


def test_deterministic_and_seed_dependent() -> None:
    a = list(easyvqa_hr_records("train", seed=7, n=12))
    b = list(easyvqa_hr_records("train", seed=7, n=12))
    assert _fingerprint(a) == _fingerprint(b)
    prefix = list(easyvqa_hr_records("train", seed=7, n=5))
    assert _fingerprint(prefix) == _fingerprint(a[:5])
    suffix = list(easyvqa_hr_records("train", seed=7, n=12, start=9))  # random access, same samples
    assert _fingerprint(suffix) == _fingerprint(a[9:])
    with pytest.raises(ValueError, match="-3"):
        next(easyvqa_hr_records("train", seed=7, n=12, start=-3))
    c = list(easyvqa_hr_records("train", seed=8, n=12))
    assert all(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, c))
    assert [x["question"] for x in a] != [y["question"] for y in c]


def test_tuple_api_matches_records() -> None:
    recs = list(easyvqa_hr_records("test", seed=1, n=4))
    tuples = list(easyvqa_hr("test", seed=1, n=4))
    assert [(r["image"].tobytes(), r["question"], r["answer"]) for r in recs] == [
        (im.tobytes(), q, a) for im, q, a in tuples
    ]


def test_sizes_and_aspect_ratios(train300: list[dict[str, Any]]) -> None:
    sizes = collections.Counter(r["image"].size for r in train300)
    assert set(sizes) <= set(CANVAS_SIZES)
    assert all(r["image"].mode == "RGB" for r in train300)
    ratios = {round(w / h, 3) for w, h in sizes}
    assert len(ratios) >= 5, sizes
    assert len(sizes) == len(CANVAS_SIZES), sizes


def test_shape_small_and_inside_bbox(train300: list[dict[str, Any]]) -> None:
    for r in train300:
        w, h = r["image"].size
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, r["bbox"]
        assert (x1 - x0) * (y1 - y0) <= MAX_AREA_FRACTION * w * h, (r["id"], r["bbox"], r["image"].size)
        # shape mask = pixels close to the drawn color; it lies inside bbox and is <= 2 %
        arr = np.asarray(r["image"], dtype=np.int32)
        target = np.array(ANSWER_COLORS[r["color"]], dtype=np.int32)
        close = ((arr - target) ** 2).sum(-1) < 40**2
        ys, xs = np.nonzero(close)
        assert len(ys) > 0
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        assert len(ys) <= MAX_AREA_FRACTION * w * h


def test_background_keeps_away_from_answer_colors(train300: list[dict[str, Any]]) -> None:
    for r in train300[:40]:
        arr = np.asarray(r["image"], dtype=np.int32).copy()
        x0, y0, x1, y1 = r["bbox"]
        arr[y0:y1, x0:x1] = 200  # mask the shape's box out
        flat = arr.reshape(-1, 3)
        _, d2 = _nearest_color(flat)
        assert d2.min() >= MIN_DISTRACTOR_DISTANCE**2, r["id"]


def test_drawn_color_and_shape_match_answers(train300: list[dict[str, Any]]) -> None:
    for r in train300:
        x0, y0, x1, y1 = r["bbox"]
        box = np.asarray(r["image"], dtype=np.int32)[y0:y1, x0:x1]
        idx, d2 = _nearest_color(box.reshape(-1, 3))
        counts = np.bincount(idx[d2 < 24**2], minlength=len(COLOR_NAMES))
        assert COLOR_NAMES[int(counts.argmax())] == r["color"], r["id"]

        # triangles are narrow on top, circles and rectangles are not
        target = np.array(ANSWER_COLORS[r["color"]], dtype=np.int32)
        mask = (((box - target) ** 2).sum(-1) < 40**2).astype(np.float64)
        third = max(1, mask.shape[0] // 3)
        ratio = mask[:third].sum() / max(mask[-third:].sum(), 1.0)
        if r["shape"] == "triangle":
            assert ratio < 0.55, (r["id"], ratio)
        else:
            assert ratio > 0.7, (r["id"], r["shape"], ratio)

        words = re.findall(r"[a-z]+", r["question"])
        if r["qtype"] == "shape":
            assert r["answer"] == r["shape"] and r["answer"] in SHAPES
        elif r["qtype"] == "color":
            assert r["answer"] == r["color"] and r["answer"] in ANSWER_COLORS
        else:
            assert r["answer"] in ("yes", "no")
            (word,) = [w for w in words if w in SHAPES or w in ANSWER_COLORS]
            present = word in (r["shape"], r["color"])
            negated = "not" in words or "no" in words
            assert (r["answer"] == "yes") == (present != negated), r


def test_balance(train300: list[dict[str, Any]]) -> None:
    qtypes = collections.Counter(r["qtype"] for r in train300)
    assert set(qtypes) == set(QTYPES)
    assert all(abs(qtypes[t] - N / 3) <= 3 for t in QTYPES), qtypes
    yn = [r for r in train300 if r["qtype"] == "yes_no"]
    answers = collections.Counter(r["answer"] for r in yn)
    assert abs(answers["yes"] - answers["no"]) <= 4, answers
    # the negation cue does not predict the answer
    cells = collections.Counter(
        (r["answer"], bool({"not", "no"} & set(re.findall(r"[a-z]+", r["question"])))) for r in yn
    )
    assert max(cells.values()) - min(cells.values()) <= 4, cells
    shapes = collections.Counter(r["answer"] for r in train300 if r["qtype"] == "shape")
    assert set(shapes) == set(SHAPES) and max(shapes.values()) - min(shapes.values()) <= 2, shapes
    colors = collections.Counter(r["answer"] for r in train300 if r["qtype"] == "color")
    assert set(colors) == set(ANSWER_COLORS) and max(colors.values()) - min(colors.values()) <= 2, colors
    assert len({r["source_question"] for r in train300}) == N  # no question repeated
    assert len({r["id"] for r in train300}) == N


def test_splits_are_easyvqa_splits(train300: list[dict[str, Any]]) -> None:
    import easy_vqa

    test_recs = list(easyvqa_hr_records("test", seed=0, n=36))
    tq, ta, tids = easy_vqa.get_test_questions()
    rq, ra, rids = easy_vqa.get_train_questions()
    for recs, (qs, ans, ids), split in ((train300, (rq, ra, rids), "train"), (test_recs, (tq, ta, tids), "test")):
        for r in recs:
            k = r["source_question"]
            assert r["source"] == f"{split}/{ids[k]}"
            assert (r["question"], r["answer"]) == (qs[k], ans[k])

    def digest(recs: list[dict[str, Any]], paths: dict[int, str]) -> set[str]:
        out = set()
        for r in recs:
            with open(paths[int(r["source"].split("/")[1])], "rb") as fh:
                out.add(hashlib.sha256(fh.read()).hexdigest())
        return out

    train_files = digest(train300, easy_vqa.get_train_image_paths())
    test_files = digest(test_recs, easy_vqa.get_test_image_paths())
    assert train_files.isdisjoint(test_files)


def test_n_none_and_errors() -> None:
    limit = easyvqa_hr_max_n("test")
    assert limit > 1000 and limit % 12 == 0
    with pytest.raises(ValueError, match=r"'train', 'test'"):
        next(easyvqa_hr_records("val"))
    with pytest.raises(ValueError, match=str(limit + 1)):
        next(easyvqa_hr_records("test", n=limit + 1))
    with pytest.raises(ValueError, match="-1"):
        next(easyvqa_hr_records("test", seed=-1))
    with pytest.raises(ValueError, match="-2"):
        next(easyvqa_hr("test", n=-2))
    gen = easyvqa_hr_records("test", seed=0, n=None)
    first = next(gen)
    assert first["id"] == "easyvqa-hr/test/0/000000"
