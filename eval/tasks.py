"""Benchmark loaders: one per task, each reading the files as the benchmark releases them, or a
Hugging Face ``datasets`` folder written with ``save_to_disk`` (lmms-lab column names).

Every task turns its records into :class:`Sample` objects (or :class:`BadRecord` for a
record it cannot read) and knows how to score one prediction and aggregate a run. The
prompt is the lmms-eval default for LLaVA models (``lmms_eval_specific_kwargs.default`` of
the task's yaml); each loader's docstring states the expected folder layout and the prompt.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import metrics as M

log = logging.getLogger(__name__)

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclass
class Sample:
    """One question. ``image`` is a path, a PIL image, or None; ``target`` is what the
    task's scorer needs (list of answers, one answer, a letter, or None when unlabeled);
    ``meta`` is copied into the result record (needed by aggregate scores)."""

    id: str
    question: str
    prompt: str
    image: Any
    target: Any
    meta: dict = field(default_factory=dict)


@dataclass
class BadRecord:
    """A record that could not be turned into a sample; reported as an error."""

    id: str
    error: str


class EmptyDatasetError(ValueError):
    """The data folder holds no sample for the task."""


class Task:
    """Base task. Subclasses set the class attributes and implement ``load_release``,
    ``from_row`` (HF rows) and ``score``; ``aggregate`` defaults to the mean score."""

    name: str = ""
    title: str = ""
    layout: str = ""
    hf_splits: tuple[str, ...] = ()
    max_new_tokens: int = 16
    metric: str = "accuracy"
    scale: float = 100.0  # the primary score is reported as ``scale * mean``

    # ---- loading
    def load(self, data: str | Path | None, limit: int | None = None) -> list[Sample | BadRecord]:
        """Load samples from ``data`` (release layout or ``save_to_disk`` folder)."""
        if data is not None and _is_hf_folder(Path(data)):
            items = list(self._load_hf(Path(data)))
        else:
            if data is None and not self.builtin_data:
                raise ValueError(f"task {self.name!r} needs --data DIR; expected layout:\n{self.layout}")
            items = list(self.load_release(None if data is None else Path(data)))
        n_ok = sum(isinstance(s, Sample) for s in items)
        if n_ok == 0:
            where = "the built-in data" if data is None else str(data)
            raise EmptyDatasetError(
                f"no {self.name} samples found in {where} ({len(items)} unreadable records); "
                f"expected layout:\n{self.layout}\nor a datasets.save_to_disk folder"
            )
        ids = [s.id for s in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: duplicate sample ids in {data}")
        return items[:limit] if limit else items

    builtin_data = False

    def load_release(self, root: Path | None) -> Iterable[Sample | BadRecord]:
        raise NotImplementedError

    def _load_hf(self, root: Path) -> Iterable[Sample | BadRecord]:
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            split = next((s for s in self.hf_splits if s in ds), None)
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split is None:
                raise ValueError(f"{self.name}: {root} has splits {list(ds)}; expected one of {self.hf_splits}")
            ds = ds[split]
        # keep images encoded: decoded lazily, one batch at a time, and a corrupt one is a
        # per-sample error instead of a crash while loading
        for col, feat in ds.features.items():
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
        for i in range(len(ds)):
            item = _guard(i, lambda: self.from_row(ds[i], i))
            if item is not None:  # from_row returns None for rows of another subset
                yield item

    def from_row(self, row: Mapping, idx: int) -> Sample:
        raise NotImplementedError

    # ---- scoring
    def score(self, sample_target: Any, meta: Mapping, prediction: str) -> float | None:
        raise NotImplementedError

    def submission(self, records: list[Mapping]) -> list[dict] | None:
        """Rows of an evaluation-server submission file, for splits without public answers."""
        return None

    def aggregate(self, records: list[Mapping]) -> dict:
        """``records`` are the JSONL result rows without errors. Returns ``{"score": float|None, ...}``."""
        scores = [r["score"] for r in records if r.get("score") is not None]
        if not scores:
            return {"score": None}
        return {"score": self.scale * statistics.mean(scores)}


def _guard(idx: int, make: Callable[[], Sample | None], rid: str | None = None) -> Sample | BadRecord | None:
    try:
        return make()
    except Exception as e:  # a malformed record must not stop the run
        return BadRecord(id=rid or f"record-{idx}", error=f"malformed record: {type(e).__name__}: {e}")


def _is_hf_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _first_existing(root: Path, rels: Iterable[str]) -> Path | None:
    for rel in rels:
        p = root / rel
        if p.exists():
            return p
    return None


def _need(root: Path | None, rels: list[str], task: "Task") -> Path:
    if root is None:
        raise ValueError(f"task {task.name!r} needs --data DIR")
    p = _first_existing(root, rels)
    if p is None:
        raise EmptyDatasetError(f"{task.name}: none of {rels} found in {root}; expected layout:\n{task.layout}")
    return p


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ======================================================================================
class VQAv2(Task):
    hf_splits = ("validation",)
    max_new_tokens = 16
    metric = "vqa_accuracy"

    def __init__(self, split: str = "val"):
        self.split = split
        if split == "val":
            self.name, self.title = "vqav2_val", "VQAv2 val"
            self.qfile, self.afile, self.imdir, self.imprefix = (
                "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                "val2014", "COCO_val2014_")
        else:
            self.name, self.title = "vqav2_testdev", "VQAv2 test-dev"
            self.qfile, self.afile, self.imdir, self.imprefix = (
                "v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015_")
            self.hf_splits = ("testdev", "test")
        self.layout = (
            f"DIR/{self.qfile}\n" + (f"DIR/{self.afile}\n" if self.afile else "")
            + f"DIR/{self.imdir}/{self.imprefix}000000XXXXXX.jpg   (COCO images)\n"
            "prompt: '{question}\\nAnswer the question using a single word or phrase.'"
        )

    def load_release(self, root):
        qs = _read_json(_need(root, [self.qfile], self))["questions"]
        anns = {}
        if self.afile:
            for a in _read_json(_need(root, [self.afile], self))["annotations"]:
                anns[a["question_id"]] = a
        for i, q in enumerate(qs):
            def make(q=q):
                qid = q["question_id"]
                target = None
                if self.afile:
                    target = [a["answer"] for a in anns[qid]["answers"]]
                img = root / self.imdir / f"{self.imprefix}{int(q['image_id']):012d}.jpg"
                return Sample(str(qid), q["question"], q["question"] + SHORT_ANSWER, img, target)
            yield _guard(i, make, rid=str(q.get("question_id", f"record-{i}")) if isinstance(q, dict) else None)

    def from_row(self, row, idx):
        ans = row.get("answers")
        target = [a["answer"] if isinstance(a, Mapping) else a for a in ans] if ans else None
        return Sample(str(row["question_id"]), row["question"], row["question"] + SHORT_ANSWER, row["image"], target)

    def score(self, target, meta, prediction):
        return None if not target else M.vqav2_accuracy(prediction, target)

    def submission(self, records):
        """EvalAI format as lmms-eval's ``vqav2_process_results``: the answer after the punctuation and
        digit/article steps."""
        if self.afile:
            return None
        def norm(a):
            return M.process_digit_article(M.process_punctuation(a.replace("\n", " ").replace("\t", " ").strip()))

        return [{"question_id": int(r["id"]), "answer": norm(r["answer"])} for r in records]


class TextVQA(Task):
    name, title = "textvqa_val", "TextVQA val"
    hf_splits = ("validation",)
    max_new_tokens = 16
    metric = "vqa_accuracy"
    layout = (
        "DIR/TextVQA_0.5.1_val.json   ({'data': [{question, question_id, image_id, answers}]})\n"
        "DIR/train_images/<image_id>.jpg   (val images ship in train_val_images.zip)\n"
        "prompt: '{Question.capitalize()}\\nAnswer the question using a single word or phrase.'"
    )

    def load_release(self, root):
        data = _read_json(_need(root, ["TextVQA_0.5.1_val.json"], self))["data"]
        imdir = _first_existing(root, ["train_images", "train_val_images/train_images"]) or root / "train_images"
        for i, q in enumerate(data):
            yield _guard(i, lambda q=q: Sample(
                str(q["question_id"]), q["question"], q["question"].capitalize() + SHORT_ANSWER,
                imdir / f"{q['image_id']}.jpg", list(q["answers"])))

    def from_row(self, row, idx):
        return Sample(str(row["question_id"]), row["question"], row["question"].capitalize() + SHORT_ANSWER,
                      row["image"], list(row["answers"]) if row.get("answers") else None)

    def score(self, target, meta, prediction):
        return None if not target else M.textvqa_accuracy(prediction, target)


class GQA(Task):
    name, title = "gqa", "GQA test-dev balanced"
    hf_splits = ("testdev", "test")
    max_new_tokens = 16
    metric = "exact_match"
    layout = (
        "DIR/testdev_balanced_questions.json   ({qid: {imageId, question, answer, ...}})\n"
        "DIR/images/<imageId>.jpg\n"
        "prompt: '{question}\\nAnswer the question using a single word or phrase.'"
    )

    def load_release(self, root):
        data = _read_json(_need(root, ["testdev_balanced_questions.json",
                                       "questions/testdev_balanced_questions.json"], self))
        for i, (qid, q) in enumerate(data.items()):
            yield _guard(i, lambda qid=qid, q=q: Sample(
                str(qid), q["question"], q["question"] + SHORT_ANSWER,
                root / "images" / f"{q['imageId']}.jpg", str(q["answer"])), rid=str(qid))

    def from_row(self, row, idx):
        if row.get("image") is None:
            raise KeyError("the GQA instructions rows carry no 'image' column; add the images (imageId -> image)")
        return Sample(str(row.get("id", idx)), row["question"], row["question"] + SHORT_ANSWER, row["image"],
                      row["answer"])

    def score(self, target, meta, prediction):
        return M.exact_match(prediction, target)


class POPE(Task):
    hf_splits = ()
    max_new_tokens = 128
    metric = "f1"

    def __init__(self, split: str):
        self.split = split
        self.name, self.title = f"pope_{split}", f"POPE {split}"
        self.hf_splits = (split, "test")
        self.layout = (
            f"DIR/coco_pope_{split}.json   (JSON lines: {{question_id, image, text, label}}, "
            "as in POPE's output/coco/)\n"
            "DIR/val2014/COCO_val2014_XXXXXXXXXXXX.jpg   (COCO val2014 images)\n"
            "prompt: '{question}\\nAnswer the question using a single word or phrase.'\n"
            "parsing: lmms-eval rule (lower/strip, exact 'yes'/'no')"
        )

    def load_release(self, root):
        path = _need(root, [f"coco_pope_{self.split}.json", f"output/coco/coco_pope_{self.split}.json"], self)
        imdir = _first_existing(root, ["val2014", "images"]) or root / "val2014"
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue

                def make(line=line):
                    r = json.loads(line)
                    label = r["label"].lower().strip()
                    if label not in ("yes", "no"):
                        raise ValueError(f"label {r['label']!r} is not yes/no")
                    q = r["text"].strip()
                    return Sample(str(r["question_id"]), q, q + SHORT_ANSWER, imdir / r["image"], label)
                yield _guard(i, make, rid=f"line-{i + 1}")

    def from_row(self, row, idx):
        # lmms-lab/POPE's default config has one "test" split with a `category` column
        if row.get("category") in ("random", "popular", "adversarial") and row["category"] != self.split:
            return None
        q = row["question"].strip()
        return Sample(str(row["question_id"]), q, q + SHORT_ANSWER, row["image"], row["answer"].lower().strip())

    def score(self, target, meta, prediction):
        return 1.0 if M.pope_parse(prediction) == target else 0.0

    def aggregate(self, records):
        if not records:
            return {"score": None}
        s = M.pope_scores([r["answer"] for r in records], [r["target"] for r in records])
        return {"score": 100 * s["f1"], **{k: 100 * v for k, v in s.items()}}


class ScienceQAImg(Task):
    name, title = "scienceqa_img", "ScienceQA-IMG (test)"
    hf_splits = ("test",)
    max_new_tokens = 16
    metric = "exact_match"
    layout = (
        "DIR/problems.json   ({pid: {question, choices, answer (int), hint, image, split}})\n"
        "DIR/pid_splits.json (optional)\n"
        "DIR/test/<pid>/image.png\n"
        "only test problems with an image are used\n"
        "prompt: '[Context: {hint}\\n]{question}\\nA. ..\\nB. ..\\n"
        "Answer with the option's letter from the given choices directly.'"
    )

    @staticmethod
    def prompt(question: str, choices: list[str], hint: str | None) -> str:
        opts = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
        context = f"Context: {hint}\n" if hint else ""
        return f"{context}{question}\n{opts}\nAnswer with the option's letter from the given choices directly."

    def load_release(self, root):
        probs = _read_json(_need(root, ["problems.json", "data/scienceqa/problems.json"], self))
        splits = _first_existing(root, ["pid_splits.json", "data/scienceqa/pid_splits.json"])
        test_ids = set(_read_json(splits)["test"]) if splits else None
        for i, (pid, p) in enumerate(probs.items()):
            in_test = (pid in test_ids) if test_ids is not None else (isinstance(p, dict) and p.get("split") == "test")
            if not in_test or not isinstance(p, dict) or not p.get("image"):
                continue

            def make(pid=pid, p=p):
                letter = chr(ord("A") + int(p["answer"]))
                return Sample(str(pid), p["question"], self.prompt(p["question"], list(p["choices"]), p.get("hint")),
                              root / "test" / str(pid) / p["image"], letter)
            yield _guard(i, make, rid=str(pid))

    def _load_hf(self, root):
        for s in super()._load_hf(root):
            if isinstance(s, Sample) and s.image is None:
                continue  # ScienceQA-IMG: questions with an image only
            yield s

    def from_row(self, row, idx):
        letter = chr(ord("A") + int(row["answer"]))
        return Sample(str(row.get("id", idx)), row["question"],
                      self.prompt(row["question"], list(row["choices"]), row.get("hint")), row.get("image"), letter)

    def score(self, target, meta, prediction):
        return M.scienceqa_match(prediction, target)


class MME(Task):
    name, title = "mme", "MME"
    hf_splits = ("test",)
    max_new_tokens = 16
    metric = "perception+cognition"
    scale = 1.0
    layout = (
        "DIR/<category>/images/<name>.jpg|png + DIR/<category>/questions_answers_YN/<name>.txt\n"
        "or DIR/<category>/<name>.jpg|png + DIR/<category>/<name>.txt   (MME_Benchmark_release_version)\n"
        "each .txt: two lines 'question<TAB>Yes|No'\n"
        "prompt: question without ' Please answer yes or no.' + '\\nAnswer the question using a single word or phrase.'"
    )
    _REPLACE = " Please answer yes or no."

    def _prompt(self, q: str) -> str:
        return q.strip().replace(self._REPLACE, "") + SHORT_ANSWER

    def load_release(self, root):
        if root is None or not root.is_dir():
            raise ValueError(f"task mme needs --data DIR; expected layout:\n{self.layout}")
        k = 0
        for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            cat = cat_dir.name
            qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "questions_answers_YN").is_dir() else cat_dir
            im_dir = cat_dir / "images" if (cat_dir / "images").is_dir() else cat_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                img = next((im_dir / (txt.stem + ext) for ext in (".jpg", ".png", ".jpeg")
                            if (im_dir / (txt.stem + ext)).exists()), im_dir / (txt.stem + ".jpg"))
                try:
                    lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                except Exception as e:
                    yield BadRecord(f"{cat}/{txt.stem}", f"unreadable question file: {e}")
                    continue
                for j, line in enumerate(lines):
                    def make(line=line, j=j, img=img, txt=txt):
                        q, a = line.split("\t")
                        a = a.lower().strip().replace(".", "")
                        if a not in ("yes", "no"):
                            raise ValueError(f"answer {a!r} is not yes/no")
                        return Sample(f"{cat}/{txt.stem}/{j}", q.strip(), self._prompt(q), img, a,
                                      {"category": cat, "image": f"{cat}/{img.name}"})
                    yield _guard(k, make, rid=f"{cat}/{txt.stem}/{j}")
                    k += 1

    def from_row(self, row, idx):
        a = row["answer"].lower().strip().replace(".", "")
        return Sample(f"{row['question_id']}/{idx}", row["question"].strip(), self._prompt(row["question"]),
                      row["image"], a, {"category": row["category"], "image": str(row["question_id"])})

    def score(self, target, meta, prediction):
        return 1.0 if M.mme_parse(prediction) == target else 0.0

    def aggregate(self, records):
        if not records:
            return {"score": None}
        recs = [{"category": r["meta"]["category"], "image": r["meta"]["image"], "score": r["score"]} for r in records]
        # an image whose pair partner errored or was cut by --limit cannot be scored the MME way
        by_img: dict[str, int] = {}
        for r in recs:
            by_img[r["image"]] = by_img.get(r["image"], 0) + 1
        full = [r for r in recs if by_img[r["image"]] == 2]
        if not full:
            return {"score": None, "acc": 100 * statistics.mean(r["score"] for r in recs)}
        s = M.mme_scores(full)
        out = {"score": s["total"], "perception": s["perception"], "cognition": s["cognition"],
               "acc": 100 * statistics.mean(r["score"] for r in recs)}
        out.update({f"cat/{k}": v for k, v in s["categories"].items()})
        return out


class DocVQA(Task):
    name, title = "docvqa_val", "DocVQA val"
    hf_splits = ("validation",)
    max_new_tokens = 32
    metric = "anls"
    layout = (
        "DIR/val_v1.0.json   ({'data': [{questionId, question, image: 'documents/x.png', answers}]})\n"
        "DIR/documents/<x>.png   (image paths are relative to the json's folder; DIR/val/... also accepted)\n"
        "prompt: '{question}\\nAnswer the question using a single word or phrase.'"
    )

    def load_release(self, root):
        path = _need(root, ["val_v1.0.json", "val_v1.0_withQT.json", "val/val_v1.0.json", "val/val_v1.0_withQT.json"],
                     self)
        for i, q in enumerate(_read_json(path)["data"]):
            yield _guard(i, lambda q=q: Sample(
                str(q["questionId"]), q["question"], q["question"] + SHORT_ANSWER,
                path.parent / q["image"], list(q["answers"])))

    def from_row(self, row, idx):
        return Sample(str(row["questionId"]), row["question"], row["question"] + SHORT_ANSWER, row["image"],
                      list(row["answers"]) if row.get("answers") else None)

    def score(self, target, meta, prediction):
        return None if not target else M.anls(prediction, target)


class ChartQA(Task):
    name, title = "chartqa", "ChartQA test"
    hf_splits = ("test",)
    max_new_tokens = 16
    metric = "relaxed_accuracy"
    layout = (
        "DIR/test/test_human.json, DIR/test/test_augmented.json   ([{imgname, query, label}])\n"
        "DIR/test/png/<imgname>   ('ChartQA Dataset/' prefix also accepted)\n"
        "prompt: '{question}\\nAnswer the question with a single word.'"
    )
    POST = "\nAnswer the question with a single word."

    def load_release(self, root):
        base = _first_existing(root, ["test", "ChartQA Dataset/test"]) if root else None
        if base is None:
            _need(root, ["test/test_human.json"], self)
        k = 0
        for kind in ("human", "augmented"):
            f = base / f"test_{kind}.json"
            if not f.exists():
                continue
            for i, q in enumerate(_read_json(f)):
                yield _guard(k, lambda q=q, i=i, kind=kind: Sample(
                    f"{kind}-{i}", q["query"], q["query"] + self.POST, base / "png" / q["imgname"], str(q["label"]),
                    {"type": f"{kind}_test"}), rid=f"{kind}-{i}")
                k += 1

    def from_row(self, row, idx):
        return Sample(str(idx), row["question"], row["question"] + self.POST, row["image"], str(row["answer"]),
                      {"type": row.get("type", "")})

    def score(self, target, meta, prediction):
        return M.relaxed_accuracy(prediction, target)

    def aggregate(self, records):
        out = super().aggregate(records)
        for t in ("human_test", "augmented_test"):
            s = [r["score"] for r in records if r.get("meta", {}).get("type") == t]
            if s:
                out[t.split("_")[0]] = 100 * statistics.mean(s)
        return out


class OCRBench(Task):
    name, title = "ocrbench", "OCRBench"
    hf_splits = ("test",)
    max_new_tokens = 128
    metric = "final_score"
    scale = 1.0
    layout = (
        "DIR/OCRBench.json   ([{dataset_name, id, image_path, question, answers, type}])\n"
        "DIR/OCRBench_Images/<image_path>\n"
        "prompt: '{question}' (no suffix); score: correct answers out of 1000"
    )

    def load_release(self, root):
        path = _need(root, ["OCRBench.json", "OCRBench/OCRBench.json"], self)
        imdir = _first_existing(path.parent, ["OCRBench_Images"]) or path.parent / "OCRBench_Images"
        for i, q in enumerate(_read_json(path)):
            yield _guard(i, lambda q=q, i=i: Sample(
                str(q.get("id", i)), q["question"].strip(), q["question"].strip(), imdir / q["image_path"],
                q["answers"], {"dataset": q["dataset_name"], "question_type": q["type"]}))

    def from_row(self, row, idx):
        return Sample(str(row.get("id", idx)), row["question"].strip(), row["question"].strip(), row["image"],
                      row["answer"], {"dataset": row["dataset"], "question_type": row["question_type"]})

    def score(self, target, meta, prediction):
        return M.ocrbench_match(prediction, target, meta.get("dataset", ""))

    def aggregate(self, records):
        if not records:
            return {"score": None}
        s = M.ocrbench_scores({"question_type": r["meta"]["question_type"], "score": r["score"]} for r in records)
        return {"score": s["final"], "accuracy": 100 * s["accuracy"], "mean": 100 * s["mean"],
                "recognition": s["recognition"]}


class EasyVQA(Task):
    name, title = "easyvqa", "easy-VQA (test)"
    hf_splits = ("test",)
    max_new_tokens = 8
    metric = "exact_match"
    builtin_data = True
    layout = (
        "no --data: the test split shipped by the `easy-vqa` package; or\n"
        "DIR/questions.json   ([[question, answer, image_id], ...]) + DIR/images/<image_id>.png\n"
        "prompt: '{question}\\nAnswer the question using a single word or phrase.'; score: GQA exact match"
    )

    def load_release(self, root):
        if root is None:
            try:
                import easy_vqa
            except ImportError as e:  # pragma: no cover
                raise ImportError("task easyvqa without --data needs `pip install easy-vqa`") from e
            root = Path(easy_vqa.__file__).parent / "data" / "test"
        qs = _read_json(_need(root, ["questions.json"], self))
        for i, q in enumerate(qs):
            yield _guard(i, lambda q=q, i=i: Sample(
                str(i), q[0], q[0] + SHORT_ANSWER, root / "images" / f"{int(q[2])}.png", str(q[1])))

    def from_row(self, row, idx):
        return Sample(str(idx), row["question"], row["question"] + SHORT_ANSWER, row["image"], row["answer"])

    def score(self, target, meta, prediction):
        return M.exact_match(prediction, target)


class EasyVQAHR(Task):
    """Task "easyvqa-hr" (``vlmdrop.zoo.easyvqa_hr``): easy-VQA shapes pasted small onto large cluttered
    canvases, generated on the fly from the ``easy-vqa`` package's test split (seed 0), balanced over
    question types and answers. Score: GQA exact match; the aggregate adds the accuracy per question
    type (``shape``, ``color``, ``yes_no``). ``meta`` carries the question type, the shape's bbox and the
    canvas size (for "did the kept tokens touch the shape")."""

    name, title = "easyvqa-hr", "easyvqa-hr (generated from easy-VQA test)"
    hf_splits = ("test",)
    max_new_tokens = 8
    metric = "exact_match"
    builtin_data = True
    seed = 0
    layout = (
        "no --data: generated from the test split shipped by the `easy-vqa` package (seed 0)\n"
        "prompt: '{question}\\nAnswer the question using a single word or phrase.'; score: GQA exact match"
    )

    def load(self, data, limit=None):
        if data is not None:  # --data may be a parent folder shared with other tasks
            log.warning("task %s is generated from the easy-vqa package; ignoring --data %s", self.name, data)
        items = list(self.load_release(None, limit))
        if not items:
            raise EmptyDatasetError(f"no {self.name} samples generated (limit={limit!r})")
        return items

    def load_release(self, root, limit=None):
        try:
            from vlmdrop.zoo.easyvqa_hr import easyvqa_hr_records
        except ImportError as e:  # pragma: no cover
            raise ImportError("task easyvqa-hr needs `pip install easy-vqa`") from e
        for i, r in enumerate(easyvqa_hr_records("test", seed=self.seed, n=limit)):
            yield _guard(i, lambda r=r: Sample(
                r["id"], r["question"], r["question"] + SHORT_ANSWER, r["image"], r["answer"],
                {"qtype": r["qtype"], "bbox": list(r["bbox"]), "image_size": list(r["image"].size)}), rid=r["id"])

    def score(self, target, meta, prediction):
        return M.exact_match(prediction, target)

    def aggregate(self, records):
        out = super().aggregate(records)
        for qtype in ("shape", "color", "yes_no"):
            s = [r["score"] for r in records if r.get("meta", {}).get("qtype") == qtype and r.get("score") is not None]
            if s:
                out[qtype] = 100 * statistics.mean(s)
        return out


def _build() -> dict[str, Task]:
    tasks: list[Task] = [VQAv2("val"), VQAv2("testdev"), TextVQA(), GQA(), POPE("random"), POPE("popular"),
                         POPE("adversarial"), ScienceQAImg(), MME(), DocVQA(), ChartQA(), OCRBench(), EasyVQA(),
                         EasyVQAHR()]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _build()
ALIASES = {"vqav2": "vqav2_val", "textvqa": "textvqa_val", "docvqa": "docvqa_val", "pope_pop": "pope_popular",
           "pope_adv": "pope_adversarial", "scienceqa": "scienceqa_img", "gqa_testdev": "gqa", "easy_vqa": "easyvqa",
           "easyvqa_hr": "easyvqa-hr"}


def task_names() -> list[str]:
    """Registered task names."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """Look a task up by name or alias; unknown names raise a ValueError listing the valid ones."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    return TASKS[key]
