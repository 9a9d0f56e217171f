"""Every loader on a hand-made file set in its benchmark's release format, the save_to_disk
path, prompts, per-task scoring, and bad data."""


import pytest
from eval_fixtures import MAKERS, make_pope

from vlmdrop.eval.tasks import BadRecord, EmptyDatasetError, Sample, get_task, task_names

EXPECTED = {  # task -> (number of samples, first id, first target, prompt suffix)
    "vqav2_val": (2, "10", ["red"] * 10, "\nAnswer the question using a single word or phrase."),
    "vqav2_testdev": (1, "30", None, "\nAnswer the question using a single word or phrase."),
    "textvqa_val": (1, "5", ["nokia"] * 10, "\nAnswer the question using a single word or phrase."),
    "gqa": (2, "201", "yes", "\nAnswer the question using a single word or phrase."),
    "pope_random": (2, "1", "yes", "\nAnswer the question using a single word or phrase."),
    "pope_popular": (2, "1", "yes", "\nAnswer the question using a single word or phrase."),
    "pope_adversarial": (2, "1", "yes", "\nAnswer the question using a single word or phrase."),
    "scienceqa_img": (1, "7", "B", "\nAnswer with the option's letter from the given choices directly."),
    "mme": (4, "code_reasoning/0001/0", "yes", "\nAnswer the question using a single word or phrase."),
    "docvqa_val": (1, "49153", ["1/8/93", "January 8, 1993"], "\nAnswer the question using a single word or phrase."),
    "chartqa": (2, "human-0", "42", "\nAnswer the question with a single word."),
    "ocrbench": (2, "0", ["HELLO"], "written in the image?"),
    "easyvqa": (2, "0", "circle", "\nAnswer the question using a single word or phrase."),
}


def test_registry_covers_all_benchmarks():
    assert set(EXPECTED) | {"easyvqa-hr"} == set(task_names())  # easyvqa-hr is generated: test_eval_easyvqa_hr.py
    with pytest.raises(ValueError, match="valid tasks: .*vqav2_val"):
        get_task("nope")
    assert get_task("pope_adv").name == "pope_adversarial"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_release_loader(name, tmp_path):
    root = MAKERS[name](tmp_path / name)
    task = get_task(name)
    items = task.load(root)
    n, first_id, target, suffix = EXPECTED[name]
    assert all(isinstance(s, Sample) for s in items), items
    assert len(items) == n
    assert items[0].id == first_id
    assert items[0].target == target
    assert items[0].prompt.endswith(suffix)
    assert items[0].image.is_file(), items[0].image
    assert task.layout  # documented


def test_prompts_follow_lmms_eval(tmp_path):
    sqa = get_task("scienceqa_img").load(MAKERS["scienceqa_img"](tmp_path / "s"))[0]
    assert sqa.prompt == ("Context: Look.\nWhich is a mammal?\nA. frog\nB. dog\n"
                          "Answer with the option's letter from the given choices directly.")
    mme = get_task("mme").load(MAKERS["mme"](tmp_path / "m"))
    assert mme[2].prompt == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    tv = get_task("textvqa_val").load(MAKERS["textvqa_val"](tmp_path / "t"))[0]
    assert tv.prompt.startswith("What brand is this?")  # lmms-eval capitalizes TextVQA questions


def test_scoring_and_aggregates(tmp_path):
    pope = get_task("pope_random")
    assert pope.score("yes", {}, "Yes") == 1.0 and pope.score("yes", {}, "Yes.") == 0.0
    recs = [{"answer": "yes", "target": "yes", "score": 1.0}, {"answer": "yes", "target": "no", "score": 0.0}]
    agg = pope.aggregate(recs)
    assert agg["accuracy"] == 50.0 and agg["precision"] == 50.0 and agg["recall"] == 100.0

    mme = get_task("mme")
    items = mme.load(MAKERS["mme"](tmp_path / "m"))
    recs = [{"score": mme.score(s.target, s.meta, "Yes"), "meta": s.meta} for s in items]
    agg = mme.aggregate(recs)  # each image: one right, one wrong -> acc 50, acc+ 0
    assert agg["perception"] == 50.0 and agg["cognition"] == 50.0 and agg["score"] == 100.0

    ocr = get_task("ocrbench")
    items = ocr.load(MAKERS["ocrbench"](tmp_path / "o"))
    assert ocr.score(items[0].target, items[0].meta, "It says hello") == 1.0
    assert ocr.score(items[1].target, items[1].meta, "x^2") == 1.0
    assert get_task("vqav2_testdev").score(None, {}, "yes") is None


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    im = Image.new("RGB", (20, 20), "red")
    ds = datasets.Dataset.from_dict({
        "question_id": ["a", "b"], "question": ["Is there a dog?", "Is there a cat?"],
        "answer": ["yes", "no"], "category": ["x", "x"], "image": [im, im],
    }).cast_column("image", datasets.Image())
    datasets.DatasetDict({"random": ds}).save_to_disk(str(tmp_path / "pope"))
    items = get_task("pope_random").load(tmp_path / "pope")
    assert [s.id for s in items] == ["a", "b"] and items[1].target == "no"
    from vlmdrop.eval.runner import load_image

    assert load_image(items[0].image).size == (20, 20)  # kept encoded until used

    # lmms-lab/POPE default layout: one "test" split, the subset in `category`
    mixed = datasets.Dataset.from_dict({
        "question_id": ["a", "b", "c"], "question": ["q?"] * 3, "answer": ["yes", "no", "yes"],
        "category": ["random", "adversarial", "random"], "image": [im] * 3,
    }).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": mixed}).save_to_disk(str(tmp_path / "pope_mixed"))
    assert [s.id for s in get_task("pope_random").load(tmp_path / "pope_mixed")] == ["a", "c"]
    assert [s.id for s in get_task("pope_adversarial").load(tmp_path / "pope_mixed")] == ["b"]

    vqa = datasets.Dataset.from_dict({
        "question_id": [1], "question": ["q?"], "image": [im],
        "answers": [[{"answer": "red", "answer_confidence": "yes", "answer_id": k} for k in range(10)]],
    }).cast_column("image", datasets.Image())
    vqa.save_to_disk(str(tmp_path / "vqa"))
    (s,) = get_task("vqav2_val").load(tmp_path / "vqa")
    assert s.target == ["red"] * 10


def test_malformed_records_are_reported_not_fatal(tmp_path):
    root = make_pope(tmp_path / "p")
    with open(root / "coco_pope_random.json", "a") as f:
        f.write('{"question_id": 3, "image": "x.jpg", "text": "Is there?"}\n')  # no label
        f.write("this is not json\n")
        f.write('{"question_id": 5, "image": "x.jpg", "text": "Is there?", "label": "maybe"}\n')
    items = get_task("pope_random").load(root)
    bad = [s for s in items if isinstance(s, BadRecord)]
    assert len(items) == 5 and len(bad) == 3
    assert all("malformed record" in b.error for b in bad)


def test_empty_dataset_is_a_clear_error(tmp_path):
    root = tmp_path / "pope"
    root.mkdir()
    (root / "coco_pope_random.json").write_text("")
    with pytest.raises(EmptyDatasetError, match="no pope_random samples.*expected layout"):
        get_task("pope_random").load(root)
    with pytest.raises(EmptyDatasetError, match="TextVQA_0.5.1_val.json"):
        get_task("textvqa_val").load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs --data"):
        get_task("gqa").load(None)


def test_easyvqa_builtin_data():
    pytest.importorskip("easy_vqa")
    items = get_task("easyvqa").load(None, limit=5)
    assert len(items) == 5 and all(s.image.is_file() for s in items)


def test_hf_folder_with_corrupt_image_is_a_sample_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    from eval_fixtures import FakeGenerator

    from vlmdrop.eval.results import read_jsonl
    from vlmdrop.eval.runner import EvalConfig, run_eval

    ds = datasets.Dataset.from_dict({
        "question_id": ["a", "b", "c"], "question": ["Is there a dog?"] * 3, "answer": ["yes", "no", "yes"],
        "category": ["x"] * 3,
        "image": [{"bytes": _png_bytes(), "path": None}, {"bytes": b"garbage", "path": None}, None],
    }).cast_column("image", datasets.Image(decode=False))
    ds.save_to_disk(str(tmp_path / "pope"))
    run_eval(EvalConfig(tasks=["pope_random"], out=str(tmp_path / "out"), methods=["hired"], budgets=[0.5],
                        data=str(tmp_path / "pope"), progress=False), generator=FakeGenerator(default="yes"))
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "pope_random" / "full@1.part0.jsonl")}
    assert rows["a"]["error"] is None and rows["a"]["score"] == 1.0
    assert rows["b"]["error"].startswith("image:") and rows["c"]["error"] == "image: ValueError: sample has no image"


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    return buf.getvalue()
