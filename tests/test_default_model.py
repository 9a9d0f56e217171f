"""The shipped checkpoint: loads through from_pretrained, is small, and answers held-out easyvqa-hr
questions far above chance, also with HiRED at 10 %."""

import json

import pytest
import torch

pytest.importorskip("easy_vqa")

from vlmdrop.zoo import default_model_path, load_default  # noqa: E402
from vlmdrop.zoo.easyvqa_hr import easyvqa_hr_records  # noqa: E402
from vlmdrop.zoo.evaluate import evaluate_dropping, main  # noqa: E402


@pytest.fixture(scope="module")
def default():
    return load_default()


@pytest.fixture(scope="module")
def records():
    # held-out test questions the training never saw, 16 per question type
    return list(easyvqa_hr_records("test", seed=0, n=48))


@pytest.fixture(scope="module")
def scores(default, records):
    """`evaluate_dropping` on those questions: the full model, HiRED and random at 10 %, computed once."""
    model, processor = default
    return {"full": evaluate_dropping(model, processor, records, None, 1.0),
            "hired": evaluate_dropping(model, processor, records, "hired", 0.1),
            "random": evaluate_dropping(model, processor, records, "random", 0.1)}


def test_checkpoint_files_and_size():
    folder = default_model_path()
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]


def test_loads_through_from_pretrained(default):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model, processor = default
    assert type(model) is LlavaNextForConditionalGeneration and isinstance(processor, LlavaNextProcessor)
    assert not model.training and model.config._attn_implementation == "sdpa"


def test_answers_held_out_questions(scores):
    full = scores["full"]
    # chance: shape 1/3, colour 1/8, yes/no 1/2 (run 24: 0.90 / 1.00 / 0.99 on 240 held-out, 0.94 / 1.00 / 0.94 here)
    assert full["shape"] >= 0.8 and full["color"] >= 0.8 and full["yes_no"] >= 0.8, full
    hired = scores["hired"]
    assert hired["kept_mean"] == pytest.approx(0.1 * full["n_before_mean"], abs=1.0)
    assert hired["shape"] >= 0.75 and hired["color"] >= 0.75 and hired["yes_no"] >= 0.8, hired
    assert hired["touch"] >= 0.8, hired
    for q in ("shape", "color", "yes_no"):  # issue 17: HiRED at 10 % keeps >= 95 % of the full accuracy per type
        assert hired[q] >= 0.95 * full[q], (q, full, hired)


def test_answers_live_where_the_shape_is(scores):
    """Locality (issue 17): the shape and colour answers are read from the shape's own tokens, so random dropping at
    10 %, whose kept tokens miss the shape in about 40 % of the samples, loses them, while HiRED keeps them."""
    full, hired, rnd = scores["full"], scores["hired"], scores["random"]
    for q in ("shape", "color"):
        assert rnd[q] <= full[q] - 0.15, (q, full, rnd)
        assert hired[q] >= rnd[q] + 0.15, (q, hired, rnd)
    assert rnd["touch"] < 0.8 and rnd.get("color_missed_n", 0) >= 3 and rnd["color_missed"] <= 0.5, rnd


def test_generate_answers_in_words(default, records):
    """`generate` with the prompt every entry point sends (LLaVA's short-answer suffix, as `vlmdrop run`'s default
    question, the demo's samples and `vlmdrop eval`'s easyvqa-hr task): the answer word, for each question type.
    The model never saw a question without the suffix in training (README, *The embedded model*)."""
    from vlmdrop.cli import build_prompt
    from vlmdrop.zoo.mini import SUFFIX

    model, processor = default
    for qtype in ("color", "shape", "yes_no"):
        recs = [r for r in records if r["qtype"] == qtype][:4]
        inputs = processor(images=[r["image"] for r in recs],
                           text=[build_prompt(processor, r["question"] + SUFFIX) for r in recs],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        words = [t.split()[0] if t.split() else "" for t in texts]
        assert sum(w == r["answer"] for w, r in zip(words, recs)) >= 3, (qtype, words, [r["answer"] for r in recs])


def test_evaluate_cli_prints_the_table(capsys, caplog, tmp_path):
    caplog.set_level("INFO")
    rc = main(["--n", "12", "--methods", "hired,random", "--budgets", "0.1", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    cap = capsys.readouterr()
    out = cap.out
    assert "| full |" in out and "| hired@0.1 |" in out and "| random@0.1 |" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == {"full", "hired@0.1", "random@0.1"} and res["random@0.1"]["kept_mean"] > 0
    # a formatted table: every fraction with 3 decimals, the same numbers as the JSON
    for name, r in res.items():
        row = [line for line in out.splitlines() if line.startswith(f"| {name} |")][0].split(" | ")
        assert row[1:5] == [f"{r[q]:.3f}" for q in ("shape", "color", "yes_no", "all")], row
        assert row[5:8] == [f"{r[q] / res['full'][q]:.3f}" for q in ("shape", "color", "yes_no")], row
        assert row[8] == f"{r['touch']:.3f}", row
    # a legend under the table, one progress bar per configuration on stderr, no raw result dicts
    legend = out.split("| random@0.1 |")[1]
    assert "touch:" in legend and "kept tokens:" in legend and "when missed:" in legend
    for label in ("[1/3] full", "[2/3] hired@0.1", "[3/3] random@0.1"):
        assert label in cap.err and "12/12" in cap.err
    assert not any("{'shape'" in m for m in caplog.messages), caplog.messages


def test_evaluate_cli_without_tqdm_logs_one_line_per_configuration(monkeypatch, capsys, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError, as without the extra
    caplog.set_level("INFO", logger="vlmdrop.zoo.evaluate")
    assert main(["--n", "12", "--methods", "hired", "--budgets", "0.1"]) == 0
    cap = capsys.readouterr()
    assert "| hired@0.1 |" in cap.out and "sample/s" not in cap.err
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmdrop.zoo.evaluate"]
    assert len(lines) == 2 and lines[0].startswith("[1/2] full: 12 samples in ") and \
        lines[1].startswith("[2/2] hired@0.1: 12 samples in "), lines
