"""Benchmark metrics as pure functions, reproducing lmms-eval's behaviour exactly.

Every function here was written against the lmms-eval source (EvolvingLMMs-Lab/lmms-eval,
checked against the 0.7.3 release); the docstring of each names the file it matches. The
quirks of the reference code are reproduced on purpose (they change published numbers);
each one is pointed out in a comment.

Nothing in this module imports torch or any model code.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

__all__ = [
    "process_punctuation",
    "process_digit_article",
    "evalai_normalize",
    "vqav2_accuracy",
    "textvqa_accuracy",
    "levenshtein",
    "anls",
    "relaxed_accuracy",
    "pope_parse",
    "pope_scores",
    "exact_match",
    "scienceqa_match",
    "mme_parse",
    "mme_scores",
    "ocrbench_match",
    "ocrbench_scores",
]

# --------------------------------------------------------------------------------------
# EvalAI answer processor
# (lmms_eval/tasks/_task_utils/vqa_eval_metric.py, class EvalAIAnswerProcessor, itself
#  taken from facebookresearch/mmf).
# --------------------------------------------------------------------------------------

# Written as "<without apostrophe> -> <with apostrophe>"; the reference table also maps a few
# forms that already contain apostrophes (and one odd "somebody'd" -> "somebodyd").
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Quirk kept from the reference: "(?!<=\d)" is a *lookahead* for the literal text "<=" plus a
# digit (a typo for a lookbehind), so in practice a period is removed whenever it is not
# followed by a digit: "3.5" and ".5" keep theirs, "end." and "3." lose it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!"]
# Quirk kept: the reference calls ``PERIOD_STRIP.sub("", text, re.UNICODE)``; the third
# positional argument of ``Pattern.sub`` is ``count``, so at most re.UNICODE == 32 periods go.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """EvalAI punctuation step (``EvalAIAnswerProcessor.process_punctuation``).

    For each punctuation mark: deleted if it touches a space in the *original* text or if the
    text has a comma between two digits anywhere, otherwise replaced by a space. Then periods
    not followed by a digit are deleted (at most 32 of them, as in the reference).
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """EvalAI word step (``EvalAIAnswerProcessor.process_digit_article``).

    Lower-cases, splits on whitespace, maps number words zero..ten (and "none") to digits,
    drops the articles a/an/the, then restores apostrophes of known contractions.
    """
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(text: str) -> str:
    """The whole EvalAI answer processor (``EvalAIAnswerProcessor.__call__``).

    lower-case, delete "," and "?", split "'s" into " 's", strip; newlines/tabs to spaces;
    then :func:`process_punctuation` and :func:`process_digit_article`.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, #matches / 3)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer, got []")
    accs = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        accs.append(min(1.0, matches / 3))
    return float(statistics.mean(accs))


def vqav2_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy as ``lmms_eval/tasks/vqav2/utils.py::vqav2_process_results``.

    Prediction and each answer: newlines/tabs to spaces, strip, then only
    :func:`process_punctuation` and :func:`process_digit_article` -- *not* the full EvalAI
    processor (no up-front lower-casing, no removal of "?"/"," before the punctuation step,
    no "'s" split). Accuracy = mean over the 10 leave-one-out subsets of min(1, matches/3).

    lmms-eval compares answer *dicts* to build the subsets; the VQAv2 answers carry distinct
    ``answer_id``s, so this is exactly leave-one-out by position, which is what we do.
    """
    def norm(s: str) -> str:
        s = s.replace("\n", " ").replace("\t", " ").strip()
        return process_digit_article(process_punctuation(s))

    return _leave_one_out_accuracy(norm(prediction), [norm(a) for a in answers])


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA accuracy as ``lmms_eval/tasks/textvqa/utils.py::textvqa_process_results``.

    Prediction and answers go through the whole EvalAI processor (:func:`evalai_normalize`),
    then the leave-one-out min(1, matches/3) average.
    """
    return _leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


# --------------------------------------------------------------------------------------
# ANLS (lmms_eval/api/metrics.py::anls and ::levenshtein_distance)
# --------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, each cost 1), pure Python."""
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        cur = [j]
        for i, ca in enumerate(a, start=1):
            cost = 0 if ca == cb else 1
            cur.append(min(prev[i] + 1, cur[i - 1] + 1, prev[i - 1] + cost))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (``lmms_eval/api/metrics.py::anls``).

    Both strings are stripped, lower-cased and whitespace-collapsed before the distance, but --
    as in the reference -- the normaliser is the max of the *raw* lengths. Score = 1 - min NL
    over the answers, set to 0 when below ``threshold``. The benchmark ANLS is the mean of this.
    """
    if not answers:
        raise ValueError("ANLS needs at least one ground-truth answer, got []")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for ans in answers:
        gt = " ".join(ans.strip().lower().split())
        length = max(len(ans.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else float(score)


# --------------------------------------------------------------------------------------
# ChartQA (lmms_eval/tasks/chartqa/utils.py::relaxed_correctness)
# --------------------------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy as ``lmms_eval/tasks/chartqa/utils.py::relaxed_correctness``.

    If both parse as floats ("12%" -> 0.12) and the answer is non-zero: correct when
    |pred - ans| / |ans| <= 5 %. Otherwise case-insensitive exact string match (no stripping:
    the reference does not strip; our runner strips generated text before scoring).
    """
    p, t = _to_float(prediction), _to_float(answer)
    if p is not None and t:
        return 1.0 if abs(p - t) / abs(t) <= max_relative_change else 0.0
    return 1.0 if prediction.lower() == answer.lower() else 0.0


# --------------------------------------------------------------------------------------
# POPE (lmms_eval/tasks/pope/utils.py)
# --------------------------------------------------------------------------------------

POPE_PARSE_RULES = ("lmms-eval", "pope")


def pope_parse(prediction: str, rule: str = "lmms-eval") -> str:
    """Map a generated answer to "yes", "no" or (lmms-eval rule only) itself.

    ``rule="lmms-eval"`` (default, ``pope_process_results``): ``prediction.lower().strip()``,
    compared verbatim -- "Yes." is neither yes nor no and therefore always wrong.
    ``rule="pope"`` (the POPE repository's evaluate.py): keep the first sentence, drop
    periods and commas, "no" if any word is "no"/"not" else "yes".
    """
    if rule == "lmms-eval":
        return prediction.lower().strip()
    if rule == "pope":
        text = prediction
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    raise ValueError(f"unknown POPE parsing rule {rule!r}; valid: {POPE_PARSE_RULES}")


def pope_scores(predictions: list[str], labels: list[str], rule: str = "lmms-eval") -> dict:
    """POPE accuracy, precision, recall, F1 and yes-ratio as the ``pope_aggregate_*`` functions.

    Parsing rule: see :func:`pope_parse` (default: lmms-eval's exact "yes"/"no" match after
    lower/strip). Precision counts only predictions equal to "yes"; recall counts only
    predictions equal to "yes" or "no" among gold "yes" (as in the reference, an unparsable
    answer on a gold-yes question is *not* a false negative).

    ``yes_ratio`` reproduces lmms-eval: the share of *gold* labels that are "yes" (the POPE
    paper reports the share of *predicted* "yes"; that one is returned as ``pred_yes_ratio``).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_scores needs at least one prediction")
    preds = [pope_parse(p, rule) for p in predictions]
    gts = [g.lower().strip() for g in labels]
    for g in gts:
        if g not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {g!r}")
    tp = sum(1 for p, g in zip(preds, gts) if g == "yes" and p == "yes")
    fp = sum(1 for p, g in zip(preds, gts) if g == "no" and p == "yes")
    fn = sum(1 for p, g in zip(preds, gts) if g == "yes" and p == "no")
    acc = sum(1.0 for p, g in zip(preds, gts) if p == g) / len(gts)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    n_yes, n_no = gts.count("yes"), gts.count("no")
    return {
        "accuracy": acc,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": n_yes / (n_yes + n_no),
        "pred_yes_ratio": preds.count("yes") / len(preds),
    }


# --------------------------------------------------------------------------------------
# GQA / ScienceQA (lmms-eval ``exact_match`` with ignore_case + ignore_punctuation, and
# lmms_eval/tasks/scienceqa/utils.py::sqa_process_results)
# --------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str) -> float:
    """GQA: lmms-eval's ``exact_match`` metric with ``ignore_case`` and ``ignore_punctuation``
    (``lmms_eval/api/metrics.py::exact_match_hf_evaluate``, options from ``tasks/gqa/gqa.yaml``):
    lower-case both, delete every ``string.punctuation`` character, compare. Whitespace is
    *not* normalised ("red car" != "red  car"); our runner strips the generated text.
    """
    p = prediction.lower().translate(_PUNCT_TABLE)
    a = answer.lower().translate(_PUNCT_TABLE)
    return 1.0 if p == a else 0.0


def scienceqa_match(prediction: str, answer_letter: str) -> float:
    """ScienceQA-IMG as ``lmms_eval/tasks/scienceqa/utils.py::sqa_process_results`` (LLaVA's rule).

    Correct if the stripped prediction equals the letter (case-insensitive), or if it starts
    with an upper-case letter followed by "." ("B. the moon") and that letter is the answer.
    """
    target = answer_letter.strip().lower()
    pred = prediction.strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return 1.0 if pred[0].lower() == target else 0.0
    return 0.0


# --------------------------------------------------------------------------------------
# MME (lmms_eval/tasks/mme/utils.py)
# --------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_parse(prediction: str) -> str:
    """MME answer parsing (``parse_pred_ans``, from Otter): "yes", "no" or "other".

    lower, strip, delete periods; exact yes/no; a single "y"/"n"; else look for "yes" then
    "no" inside the first four characters.
    """
    p = prediction.lower().strip().replace(".", "")
    if p in ("yes", "no"):
        return p
    if len(p) == 1:
        return {"y": "yes", "n": "no"}.get(p, "other")
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores as ``mme_aggregate_results``.

    ``records``: mappings with ``category``, ``image`` (the pair key: lmms-eval's
    ``question_id``, i.e. the image both questions share) and ``score`` (0/1). Per category:
    mean over images of acc + acc+ (acc = % correct of the image's two questions, acc+ = 100
    if both are right); ``perception`` / ``cognition`` are the sums over their categories
    (max 2000 / 800). Raises if an image does not have exactly two questions.
    """
    per_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        per_cat[r["category"]][r["image"]].append(float(r["score"]))
    categories: dict[str, float] = {}
    for cat, by_image in per_cat.items():
        total = 0.0
        for image, scores in by_image.items():
            if len(scores) != 2:
                raise ValueError(f"MME scores pairs of questions; image {image!r} in {cat!r} has {len(scores)}")
            acc = sum(scores) / 2 * 100.0
            acc_plus = 100.0 if sum(scores) == 2 else 0.0
            total += acc + acc_plus
        categories[cat] = total / len(by_image)
    perception = sum(v for k, v in categories.items() if k in MME_PERCEPTION)
    cognition = sum(v for k, v in categories.items() if k not in MME_PERCEPTION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "categories": categories}


# --------------------------------------------------------------------------------------
# OCRBench (lmms_eval/tasks/ocrbench/utils.py)
# --------------------------------------------------------------------------------------

def _fold_fullwidth(text: str) -> str:
    """Fullwidth ASCII (U+FF01..U+FF5E) to ASCII and the ideographic space to a space."""
    out = []
    for ch in text:
        cp = ord(ch)
        if 0xFF01 <= cp <= 0xFF5E:
            out.append(chr(cp - 0xFEE0))
        elif cp == 0x3000:
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def ocrbench_match(prediction: str, answers: str | list[str], dataset: str = "") -> float:
    """OCRBench per-question score as ``ocrbench_process_results``: 1 if any gold answer is a
    *substring* of the prediction. For ``dataset == "HME100k"`` (handwritten maths) all spaces
    are removed and case is kept; otherwise fullwidth characters are folded and both are
    lower-cased and stripped (newlines become spaces).
    """
    golds = answers if isinstance(answers, list) else [answers]
    pred = prediction.strip()
    for gold in golds:
        if dataset == "HME100k":
            a = gold.strip().replace("\n", " ").replace(" ", "")
            p = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            a = _fold_fullwidth(gold).lower().strip().replace("\n", " ")
            p = _fold_fullwidth(pred).lower().strip().replace("\n", " ")
        if a in p:
            return 1.0
    return 0.0


OCRBENCH_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition",
                        "Artistic Text Recognition", "Handwriting Recognition",
                        "Digit String Recognition", "Non-Semantic Text Recognition")


def ocrbench_scores(records: Iterable[Mapping]) -> dict:
    """OCRBench totals as ``ocrbench_aggregate_accuracy``: ``final`` is the number of correct
    answers (out of 1000 on the full benchmark) and ``accuracy`` = final / 1000, exactly as
    lmms-eval reports it (so a ``--limit`` run has a small ``accuracy``; see ``mean``).
    ``records``: mappings with ``question_type`` and ``score``.
    """
    by_type: dict[str, float] = defaultdict(float)
    n = 0
    for r in records:
        by_type[r["question_type"]] += float(r["score"])
        n += 1
    final = sum(by_type.values())
    return {"final": final, "accuracy": final / 1000.0, "mean": final / n if n else 0.0,
            "recognition": sum(by_type.get(k, 0.0) for k in OCRBENCH_RECOGNITION),
            "types": dict(by_type)}
