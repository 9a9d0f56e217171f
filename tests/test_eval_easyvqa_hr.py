"""Eval task "easyvqa-hr": generated samples, prompt, exact-match scoring, per-question-type aggregate."""

import json

import pytest
from PIL import Image

pytest.importorskip("easy_vqa")

from vlmdrop.eval.tasks import SHORT_ANSWER, Sample, get_task  # noqa: E402


def test_easyvqa_hr_task_loads_generated_samples():
    task = get_task("easyvqa-hr")
    assert get_task("easyvqa_hr") is task
    items = task.load(None, limit=12)
    assert len(items) == 12 and all(isinstance(s, Sample) for s in items)
    assert items[0].id == "easyvqa-hr/test/0/000000"
    assert all(s.prompt == s.question + SHORT_ANSWER for s in items)
    assert all(isinstance(s.image, Image.Image) for s in items)
    assert sorted(s.meta["qtype"] for s in items) == ["color"] * 4 + ["shape"] * 4 + ["yes_no"] * 4
    for s in items:
        x0, y0, x1, y1 = s.meta["bbox"]
        w, h = s.meta["image_size"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    json.dumps([s.meta for s in items])  # the runner writes meta into JSONL


def test_easyvqa_hr_scores_per_question_type():
    task = get_task("easyvqa-hr")
    items = task.load(None, limit=12)
    records = []
    for k, s in enumerate(items):
        right = s.meta["qtype"] != "color" or k % 2 == 0  # every shape/yes_no right, some colors wrong
        pred = (s.target.capitalize() + ".") if right else "purple"
        records.append({"score": task.score(s.target, s.meta, pred), "meta": s.meta})
    agg = task.aggregate(records)
    n_color_right = sum(1 for k, s in enumerate(items) if s.meta["qtype"] == "color" and k % 2 == 0)
    assert agg["shape"] == 100.0 and agg["yes_no"] == 100.0
    assert agg["color"] == pytest.approx(100.0 * n_color_right / 4)
    assert agg["score"] == pytest.approx(100.0 * (8 + n_color_right) / 12)
