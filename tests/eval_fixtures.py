"""Hand-made miniature file sets in each benchmark's release format (written by the tests)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def img(path: Path, color: str = "red", size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def make_vqav2(root: Path) -> Path:
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 1, "question": "What color is it?", "question_id": 10},
        {"image_id": 2, "question": "How many?", "question_id": 20},
    ]})
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 10, "image_id": 1,
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 20, "image_id": 2,
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
    ]})
    img(root / "val2014" / "COCO_val2014_000000000001.jpg")
    img(root / "val2014" / "COCO_val2014_000000000002.jpg", "blue")
    write_json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": [
        {"image_id": 3, "question": "Is it?", "question_id": 30}]})
    img(root / "test2015" / "COCO_test2015_000000000003.jpg")
    return root


def make_textvqa(root: Path) -> Path:
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question": "what brand is this?", "image_id": "abc", "question_id": 5, "answers": ["nokia"] * 10},
    ]})
    img(root / "train_images" / "abc.jpg")
    return root


def make_gqa(root: Path) -> Path:
    write_json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is."},
        "202": {"imageId": "n2", "question": "Which side?", "answer": "left"},
    })
    img(root / "images" / "n1.jpg")
    img(root / "images" / "n2.jpg")
    return root


def make_pope(root: Path, split: str = "random") -> Path:
    lines = [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?",
         "label": "no"},
    ]
    (root).mkdir(parents=True, exist_ok=True)
    (root / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    img(root / "val2014" / "COCO_val2014_000000000001.jpg")
    return root


def make_scienceqa(root: Path) -> Path:
    write_json(root / "problems.json", {
        "7": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "Look.",
              "image": "image.png", "split": "test"},
        "8": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": None, "split": "test"},
        "9": {"question": "Train one", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train"},
    })
    write_json(root / "pid_splits.json", {"test": ["7", "8"], "train": ["9"]})
    img(root / "test" / "7" / "image.png")
    return root


def make_mme(root: Path) -> Path:
    # layout 1: images/ + questions_answers_YN/
    cat = root / "existence"
    img(cat / "images" / "000.jpg")
    (cat / "questions_answers_YN").mkdir(parents=True)
    (cat / "questions_answers_YN" / "000.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n")
    # layout 2: image and txt side by side
    cat = root / "code_reasoning"
    img(cat / "0001.png")
    (cat / "0001.txt").write_text("Does the code print 3? Please answer yes or no.\tYes\n"
                                  "Does the code print 4? Please answer yes or no.\tNo\n")
    return root


def make_docvqa(root: Path) -> Path:
    write_json(root / "val" / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the date?", "image": "documents/pybv0228_81.png",
         "docId": 14465, "answers": ["1/8/93", "January 8, 1993"]},
    ]})
    img(root / "val" / "documents" / "pybv0228_81.png", "white")
    return root


def make_chartqa(root: Path) -> Path:
    base = root / "ChartQA Dataset" / "test"
    write_json(base / "test_human.json", [{"imgname": "a.png", "query": "What is the max?", "label": "42"}])
    write_json(base / "test_augmented.json", [{"imgname": "b.png", "query": "Which year?", "label": "2010"}])
    img(base / "png" / "a.png", "white")
    img(base / "png" / "b.png", "white")
    return root


def make_ocrbench(root: Path) -> Path:
    write_json(root / "OCRBench.json", [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1.jpg", "question": "what is written in the image?",
         "answers": ["HELLO"], "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/2.jpg",
         "question": "Please write out the expression.", "answers": "x ^ 2",
         "type": "Handwritten Mathematical Expression Recognition"},
    ])
    img(root / "OCRBench_Images" / "IIIT5K" / "1.jpg")
    img(root / "OCRBench_Images" / "HME100k" / "2.jpg")
    return root


def make_easyvqa(root: Path) -> Path:
    write_json(root / "questions.json", [["what is the red shape?", "circle", 0], ["is there a blue shape?", "no", 1]])
    img(root / "images" / "0.png")
    img(root / "images" / "1.png", "blue")
    return root


MAKERS = {
    "vqav2_val": make_vqav2, "vqav2_testdev": make_vqav2, "textvqa_val": make_textvqa, "gqa": make_gqa,
    "pope_random": lambda r: make_pope(r, "random"), "pope_popular": lambda r: make_pope(r, "popular"),
    "pope_adversarial": lambda r: make_pope(r, "adversarial"), "scienceqa_img": make_scienceqa, "mme": make_mme,
    "docvqa_val": make_docvqa, "chartqa": make_chartqa, "ocrbench": make_ocrbench, "easyvqa": make_easyvqa,
}


class FakeGenerator:
    """A model backend stand-in: answers from a fixed table, token counts from the budget."""

    def __init__(self, answers: dict | None = None, default: str = "no", fail_after: int | None = None,
                 delay: float = 0.0):
        self.answers = answers or {}
        self.default = default
        self.fail_after = fail_after
        self.delay = delay
        self.calls: list[str] = []
        self.budget = 1.0

    def method_names(self):
        return ["hired", "random"]

    def configure(self, method, budget, seed, params=None):
        self.method, self.budget, self.params = method, budget, params

    def generate(self, prompts, images, max_new_tokens):
        import time

        from vlmdrop.eval.backend import GenOutput

        outs = []
        for p in prompts:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            time.sleep(self.delay)
            self.calls.append(p)
            n = 100
            outs.append(GenOutput(self.answers.get(p.split("\n")[0], self.default), n, round(self.budget * n),
                                  0.01 * self.budget + 0.001, 50.0, 123.0, 3))
        return outs


def slow_fake():
    """Factory for ``--model py:eval_fixtures:slow_fake`` (subprocess tests)."""
    return FakeGenerator(default="circle", delay=0.3)
