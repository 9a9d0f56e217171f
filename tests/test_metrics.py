"""Golden-value tests for vlmdrop.eval.metrics.

Expected values were produced by running lmms-eval 0.7.3's own functions
(tasks/_task_utils/vqa_eval_metric.py, tasks/*/utils.py, api/metrics.py) on the same inputs;
a 20 000-case randomised differential check against that code found no mismatch.
"""

import math

import pytest

from vlmdrop.eval import metrics as M


# ---------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "text, vqav2_form, textvqa_form",
    [
        ("Two dogs", "2 dogs", "2 dogs"),               # numbers as words
        ("ten", "10", "10"),
        ("none", "0", "0"),
        ("the cat", "cat", "cat"),                       # articles
        ("an apple.", "apple", "apple"),                 # article + final period
        ("Dont", "don't", "don't"),                      # contractions
        ("isnt it", "isn't it", "isn't it"),
        ("Im here", "im here", "im here"),               # table key is "Im": lower-cased first, so no match
        ("3,000", "3000", "3000"),                       # comma inside a number
        ("1,000,000 dollars", "1000000 dollars", "1000000 dollars"),
        ("3.5", "3.5", "3.5"),                           # period inside a number kept
        ("2.", "2", "2"),
        ("end.", "end", "end"),
        ("it's red", "it's red", "it 's red"),           # TextVQA splits 's, VQAv2 does not
        ("What's up?", "what's up", "what 's up"),
        ("a-b", "b", "b"),                               # '-' -> space, then article 'a' dropped
        ("(x)", "x", "x"),
        ("red, blue", "red blue", "red blue"),
        ("x ; y", "x y", "x y"),
        ("hello,world", "hello world", "helloworld"),    # TextVQA deletes ',' up front
    ],
)
def test_normalisation_matches_lmms_eval(text, vqav2_form, textvqa_form):
    assert M.process_digit_article(M.process_punctuation(text)) == vqav2_form
    assert M.evalai_normalize(text) == textvqa_form


def test_period_strip_count_quirk():
    # lmms-eval passes re.UNICODE (32) as `count` to re.sub: only the first 32 periods go.
    text = "." * 40
    assert M.process_punctuation(text) == "." * 8


# ---------------------------------------------------------------- VQA accuracy
def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    # prediction "2": 7 subsets keep all three "2" -> 1; 3 subsets keep two -> 2/3
    assert M.vqav2_accuracy("2", answers) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert M.vqav2_accuracy("two", answers) == pytest.approx(0.9)
    assert M.vqav2_accuracy("3", answers) == 1.0
    assert M.vqav2_accuracy("4", answers) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert M.vqav2_accuracy("cat", one) == pytest.approx(0.3)


def test_vqav2_and_textvqa_differ_where_lmms_eval_differs():
    answers = ["helloworld"] * 10
    assert M.textvqa_accuracy("hello,world", answers) == 1.0
    assert M.vqav2_accuracy("hello,world", answers) == 0.0
    answers = ["it's red"] * 10
    assert M.vqav2_accuracy("It's red.", answers) == 1.0
    assert M.textvqa_accuracy("It's red.", answers) == 1.0  # both sides get the same split
    assert M.textvqa_accuracy("The Dog", ["dog"] * 10) == 1.0
    assert M.vqav2_accuracy("The Dog", ["dog"] * 10) == 1.0


def test_vqa_accuracy_empty_answers_raises():
    with pytest.raises(ValueError):
        M.vqav2_accuracy("x", [])


# ---------------------------------------------------------------- ANLS
def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("abc", "abc") == 0


def test_anls_golden():
    assert M.anls("Hello  World", ["hello world"]) == 1.0
    # distance 1 over length 5 -> 0.8
    assert M.anls("hallo", ["hello"]) == pytest.approx(0.8)
    # best of several golds
    assert M.anls("hallo", ["xxxxx", "hello"]) == pytest.approx(0.8)
    # below threshold -> 0
    assert M.anls("abc", ["xyz"]) == 0.0
    # exactly 0.5 is kept (reference zeroes only < 0.5)
    assert M.anls("ab", ["ac"]) == pytest.approx(0.5)
    # length uses the raw strings: "  ab" vs "ab" -> distance 0 after strip
    assert M.anls("  ab", ["ab"]) == 1.0
    assert M.anls("", [""]) == 1.0


# ---------------------------------------------------------------- ChartQA
@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("104", "100", 1.0),
        ("105", "100", 1.0),
        ("105.1", "100", 0.0),
        ("12%", "0.12", 1.0),
        ("Yes", "yes", 1.0),
        ("0", "0", 1.0),         # zero gold falls back to string match
        ("0.0", "0", 0.0),
        ("1,000", "1000", 0.0),  # not a float -> string match
    ],
)
def test_relaxed_accuracy(pred, gold, expected):
    assert M.relaxed_accuracy(pred, gold) == expected


# ---------------------------------------------------------------- POPE
def test_pope_scores_golden():
    preds = ["yes", "Yes", "no", "no", "yes", "Yes.", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "yes", "no"]
    s = M.pope_scores(preds, labels)
    # lmms-eval rule: "Yes." is neither answer
    tp, fp, fn = 2, 1, 1
    assert s["accuracy"] == pytest.approx(4 / 7)
    assert s["precision"] == pytest.approx(tp / (tp + fp))
    assert s["recall"] == pytest.approx(tp / (tp + fn))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["yes_ratio"] == pytest.approx(4 / 7)  # lmms-eval: share of gold "yes"
    assert set(s) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}


def test_pope_paper_rule():
    assert M.pope_parse("Yes, there is a dog.", "pope") == "yes"
    assert M.pope_parse("No, there is not.", "pope") == "no"
    assert M.pope_parse("There is not a dog", "pope") == "no"
    s = M.pope_scores(["Yes.", "No."], ["yes", "no"], rule="pope")
    assert s["accuracy"] == 1.0
    with pytest.raises(ValueError, match="lmms-eval"):
        M.pope_parse("x", "bogus")


# ---------------------------------------------------------------- GQA / ScienceQA
def test_exact_match():
    assert M.exact_match("Yes.", "yes") == 1.0
    assert M.exact_match("left side", "left") == 0.0
    assert M.exact_match("T-shirt", "tshirt") == 1.0


@pytest.mark.parametrize(
    "pred, letter, expected",
    [("A", "A", 1.0), ("a", "A", 1.0), (" B ", "B", 1.0), ("C. the moon", "C", 1.0),
     ("a. the moon", "A", 0.0), ("D.", "C", 0.0), ("The answer is B", "B", 0.0)],
)
def test_scienceqa(pred, letter, expected):
    assert M.scienceqa_match(pred, letter) == expected


# ---------------------------------------------------------------- MME
@pytest.mark.parametrize(
    "pred, parsed",
    [("Yes", "yes"), ("no.", "no"), ("y", "yes"), ("N", "no"), ("x", "other"),
     ("Yes, it is", "yes"), ("Not really", "no"), ("I think yes", "other")],
)
def test_mme_parse(pred, parsed):
    assert M.mme_parse(pred) == parsed


def test_mme_scores():
    recs = [
        {"category": "existence", "image": "a", "score": 1}, {"category": "existence", "image": "a", "score": 1},
        {"category": "existence", "image": "b", "score": 1}, {"category": "existence", "image": "b", "score": 0},
        {"category": "code_reasoning", "image": "c", "score": 0},
        {"category": "code_reasoning", "image": "c", "score": 0},
    ]
    s = M.mme_scores(recs)
    # existence: image a 100+100, image b 50+0 -> mean 125
    assert s["categories"]["existence"] == pytest.approx(125.0)
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == 0.0
    with pytest.raises(ValueError, match="pairs"):
        M.mme_scores(recs[:3])


# ---------------------------------------------------------------- OCRBench
def test_ocrbench():
    assert M.ocrbench_match("The word is HELLO.", "hello") == 1.0
    assert M.ocrbench_match("ＨＥＬＬＯ", ["hello"]) == 1.0  # fullwidth folded
    assert M.ocrbench_match("x ^ 2", "x^2", dataset="HME100k") == 1.0
    assert M.ocrbench_match("X^2", "x^2", dataset="HME100k") == 0.0  # case kept for HME
    s = M.ocrbench_scores([{"question_type": "Doc-oriented VQA", "score": 1},
                           {"question_type": "Regular Text Recognition", "score": 1},
                           {"question_type": "Regular Text Recognition", "score": 0}])
    assert s["final"] == 2 and s["recognition"] == 1
    assert math.isclose(s["accuracy"], 0.002) and math.isclose(s["mean"], 2 / 3)
