"""Runner logic with an injected fake backend: sweep, JSONL rows, resume, torn lines, bad data,
sharding merge and reports."""

import csv
import json

import pytest
from eval_fixtures import FakeGenerator, make_easyvqa, make_pope

from vlmdrop.eval.report import summarize
from vlmdrop.eval.results import load_results, read_jsonl
from vlmdrop.eval.runner import EvalConfig, configurations, run_eval, run_task_config
from vlmdrop.eval.tasks import get_task


def _cfg(tmp_path, data, **kw):
    base = dict(tasks=["easyvqa"], out=str(tmp_path / "out"), methods=["hired", "random"], budgets=[0.1, 0.5],
                data=str(data), progress=False)
    base.update(kw)
    return EvalConfig(**base)


def test_configurations_always_include_full():
    assert configurations(["hired"], [0.2, 0.1]) == [("full", 1.0), ("hired", 0.2), ("hired", 0.1)]
    assert configurations(["full", "hired"], [0.2])[0] == ("full", 1.0)


def test_sweep_rows_and_report(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    gen = FakeGenerator({"what is the red shape?": "Circle."})
    paths = run_eval(_cfg(tmp_path, data), generator=gen)
    out = tmp_path / "out" / "easyvqa"
    rows = read_jsonl(out / "hired@0.1.part0.jsonl")
    assert [r["id"] for r in rows] == ["0", "1"]
    r = rows[0]
    for key in ("id", "answer", "score", "method", "budget", "n_before", "n_kept", "ttft_s", "decode_tps",
                "peak_mem_mb"):
        assert key in r
    assert r["method"] == "hired" and r["budget"] == 0.1 and r["n_kept"] == 10 and r["score"] == 1.0
    md = paths["easyvqa"].read_text()
    assert "| full | 1 | 100.00 | 100.0 |" in md and "| hired | 0.1 |" in md and "| random | 0.5 |" in md
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == ["full", "hired", "hired", "random", "random"]
    hired01 = table[1]
    assert float(hired01["tokens_kept"]) == 10 and float(hired01["speedup"]) > 1
    assert (out / "pareto.png").stat().st_size > 1000
    assert len(gen.calls) == 1 + 5 * 2  # warm-up + 5 configurations x 2 samples


def test_unknown_method_lists_valid_ones(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    with pytest.raises(ValueError, match="valid methods: full, hired, random"):
        run_eval(_cfg(tmp_path, data, methods=["bogus"]), generator=FakeGenerator())


def test_resume_after_kill_no_loss_no_repeat(tmp_path):
    root = make_pope(tmp_path / "pope")
    with open(root / "coco_pope_random.json", "a") as f:
        for i in range(3, 9):
            f.write(json.dumps({"question_id": i, "image": "COCO_val2014_000000000001.jpg",
                                "text": f"Is there a thing {i}?", "label": "yes"}) + "\n")
    cfg = _cfg(tmp_path, root, tasks=["pope_random"], methods=["hired"], budgets=[0.2])
    killed = FakeGenerator(default="yes", fail_after=5)  # warm-up + full (4 of 8) then "killed"
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, generator=killed)
    out = tmp_path / "out" / "pope_random"
    first = read_jsonl(out / "full@1.part0.jsonl")
    assert len(first) == 4
    # a kill in the middle of a write leaves a torn last line
    with open(out / "full@1.part0.jsonl", "a") as f:
        f.write('{"id": "7", "answer": "ye')
    again = FakeGenerator(default="yes")
    run_eval(cfg, generator=again)
    for key in ("full@1", "hired@0.2"):
        rows = read_jsonl(out / f"{key}.part0.jsonl")
        ids = [r["id"] for r in rows]
        assert sorted(ids, key=int) == [str(i) for i in range(1, 9)], (key, ids)
        assert len(ids) == len(set(ids))
    # second run generated only what was missing: warm-up + 4 (full) + 8 (hired)
    assert len(again.calls) == 1 + 4 + 8
    raw = (out / "full@1.part0.jsonl").read_text()
    assert raw.endswith("\n") and '"answer": "ye\n' not in raw


def test_bad_data_counted_and_listed(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    qs = json.loads((data / "questions.json").read_text())
    qs += [["missing image?", "no", 7], ["broken image?", "no", 8], ["malformed", "no"]]
    (data / "questions.json").write_text(json.dumps(qs))
    (data / "images" / "8.png").write_bytes(b"not a png at all")
    run_eval(_cfg(tmp_path, data, methods=["hired"], budgets=[0.5]), generator=FakeGenerator())
    out = tmp_path / "out" / "easyvqa"
    rows = {r["id"]: r for r in read_jsonl(out / "hired@0.5.part0.jsonl")}
    assert len(rows) == 5
    assert "missing image" in rows["2"]["error"]
    assert "image" in rows["3"]["error"]
    assert "malformed record" in rows["record-4"]["error"]
    assert rows["0"]["error"] is None
    md = (out / "report.md").read_text()
    assert "## Errors (6)" in md and "`2`: image: FileNotFoundError" in md
    assert "| full | 1 | 0.00 | – | 100.0 / 100.0 |" in md or "| full | 1 |" in md


def test_shards_merge_into_one_report(tmp_path):
    data = make_pope(tmp_path / "pope")
    task = get_task("pope_random")
    items = task.load(data)
    out = tmp_path / "out"
    for rank in (0, 1):
        for m, b in configurations(["hired"], [0.2]):
            run_task_config(task, items, FakeGenerator(default="yes"), m, b, out, rank=rank, world=2, progress=False)
    parts = sorted(p.name for p in (out / "pope_random").glob("*.jsonl"))
    assert parts == ["full@1.part0.jsonl", "full@1.part1.jsonl", "hired@0.2.part0.jsonl", "hired@0.2.part1.jsonl"]
    merged = load_results(out / "pope_random", "hired", 0.2)
    assert sorted(r["id"] for r in merged) == ["1", "2"]
    rows, errors = summarize(task, out, configurations(["hired"], [0.2]))
    assert rows[1]["n"] == 2 and rows[1]["score"] == pytest.approx(100 * 2 / 3)  # F1: p=0.5, r=1


def test_out_dir_of_another_run_is_refused(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    run_eval(_cfg(tmp_path, data, methods=["hired"], budgets=[0.5]), generator=FakeGenerator())
    with pytest.raises(ValueError, match="different run"):
        run_eval(_cfg(tmp_path, data, methods=["hired"], budgets=[0.5], max_new_tokens=3), generator=FakeGenerator())


def test_empty_dataset_error(tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "questions.json").write_text("[]")
    from vlmdrop.eval.tasks import EmptyDatasetError

    with pytest.raises(EmptyDatasetError, match="no easyvqa samples"):
        run_eval(_cfg(tmp_path, tmp_path / "ev"), generator=FakeGenerator())


def test_vqav2_testdev_writes_submission(tmp_path):
    from eval_fixtures import make_vqav2

    data = make_vqav2(tmp_path / "vqa")
    run_eval(_cfg(tmp_path, data, tasks=["vqav2_testdev"], methods=["hired"], budgets=[0.5]),
             generator=FakeGenerator(default="Two."))
    d = tmp_path / "out" / "vqav2_testdev"
    assert json.loads((d / "submission-hired@0.5.json").read_text()) == [{"question_id": 30, "answer": "2"}]
    assert "| full | 1 | – |" in (d / "report.md").read_text()


def test_project_cli_mounts_eval(tmp_path, capsys):
    from vlmdrop.cli import main

    data = make_easyvqa(tmp_path / "ev")
    rc = main(["eval", "--model", "py:eval_fixtures:FakeGenerator", "--task", "easyvqa", "--data", str(data),
               "--method", "hired,random", "--budget", "0.1,0.2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| random | 0.2 |" in out
    with pytest.raises(SystemExit):
        main(["eval", "--task", "easyvqa", "--budget", "1.5", "--out", str(tmp_path / "o2")])


def test_read_jsonl_repairs(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "1"}\nnot json\n{"id": "2"}\n{"id": "3", "ans')
    assert [r["id"] for r in read_jsonl(p, repair=True)] == ["1", "2"]
    assert p.read_text() == '{"id": "1"}\nnot json\n{"id": "2"}\n'  # torn tail cut, middle line kept
    p.write_text('{"id": "1"}')  # complete line without its newline
    assert [r["id"] for r in read_jsonl(p, repair=True)] == ["1"]
    assert p.read_text() == '{"id": "1"}\n'


def test_several_tasks_from_one_data_root(tmp_path):
    make_easyvqa(tmp_path / "data" / "easyvqa")
    make_pope(tmp_path / "data" / "pope_random")
    paths = run_eval(_cfg(tmp_path, tmp_path / "data", tasks=["easyvqa", "pope_random"], methods=["random"],
                          budgets=[0.3]), generator=FakeGenerator(default="yes"))
    assert set(paths) == {"easyvqa", "pope_random"}
    assert "| random | 0.3 | 66.67 |" in paths["pope_random"].read_text()  # F1 with p=0.5, r=1
