"""Issue 11, eval harness: no silent wrong result, every user error a clear message.

Run identity (seed, batch size, method parameters), method arguments that would override the
swept budget, option ranges, configurations validated against the loaded model before any
sample, error rows retried on resume, the run record written only once samples exist,
result lines that are JSON but not results, and an unusable ``--out``."""

import json
import os

import pytest
from eval_fixtures import FakeGenerator, img, make_easyvqa

from vlmdrop.eval.backend import HFGenerator
from vlmdrop.eval.cli import cli
from vlmdrop.eval.results import config_key, load_results, read_jsonl
from vlmdrop.eval.runner import EvalConfig, run_eval


def _cfg(tmp_path, data, **kw):
    base = dict(tasks=["easyvqa"], out=str(tmp_path / "out"), methods=["random"], budgets=[0.5],
                data=str(data), progress=False)
    base.update(kw)
    return EvalConfig(**base)


def model_must_not_load():
    """``--model py:test_eval_reliability:model_must_not_load``: a usage error must come first."""
    raise AssertionError("the model was loaded before the usage error was reported")


def _cli_usage_error(capsys, argv) -> str:
    """Run the stand-alone CLI, expect exit status 2 and a one-line ``vlmdrop eval: error:``; return stderr."""
    try:
        rc = cli(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "vlmdrop eval: error:" in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------------
# 1. every parameter that changes results is part of the run record
# --------------------------------------------------------------------------------------------
def test_rerun_with_another_seed_is_refused(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    run_eval(_cfg(tmp_path, data), generator=FakeGenerator())
    rows = read_jsonl(tmp_path / "out" / "easyvqa" / "random@0.5.part0.jsonl")
    assert [r["params"] for r in rows] == [{"budget": 0.5, "seed": 0}] * 2  # each row says what produced it
    again = FakeGenerator()
    with pytest.raises(ValueError, match=r"seed.*0.*7"):
        run_eval(_cfg(tmp_path, data, seed=7), generator=again)
    assert again.calls == []
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["seed"] == 0 and record["configs"]["random@0.5"] == {"budget": 0.5, "seed": 0}


def test_rerun_with_another_batch_size_or_max_new_tokens_is_refused(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    run_eval(_cfg(tmp_path, data), generator=FakeGenerator())
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(_cfg(tmp_path, data, batch_size=2), generator=FakeGenerator())
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_eval(_cfg(tmp_path, data, max_new_tokens=4), generator=FakeGenerator())


def test_method_args_are_part_of_each_configuration(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    cfg = dict(methods=["hired"], budgets=[0.2], method_args={"hired": {"alpha": 0.3}})
    run_eval(_cfg(tmp_path, data, **cfg), generator=FakeGenerator())
    # another alpha for the same configuration: refused, nothing generated
    again = FakeGenerator()
    with pytest.raises(ValueError, match=r"hired@0\.2.*alpha"):
        run_eval(_cfg(tmp_path, data, methods=["hired"], budgets=[0.2], method_args={"hired": {"alpha": 0.7}}),
                 generator=again)
    assert again.calls == []
    # adding a method with its own parameters reuses what is there
    more = FakeGenerator()
    run_eval(_cfg(tmp_path, data, methods=["hired", "random"], budgets=[0.2], method_args={"hired": {"alpha": 0.3}}),
             generator=more)
    assert len(more.calls) == 1 + 2  # warm-up + random@0.2 only
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["configs"] == {"full@1": {}, "hired@0.2": {"budget": 0.2, "alpha": 0.3},
                                 "random@0.2": {"budget": 0.2, "seed": 0}}
    md = (tmp_path / "out" / "easyvqa" / "report.md").read_text()
    assert "`hired@0.2`: budget=0.2, alpha=0.3" in md


def test_run_record_of_an_older_version_or_corrupt_is_refused_clearly(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "<default>", "data": str(data.resolve()),
                                              "max_new_tokens": None, "method_args": {}}))
    with pytest.raises(ValueError, match="older vlmdrop"):
        run_eval(_cfg(tmp_path, data), generator=FakeGenerator())
    (out / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json is not a vlmdrop run record"):
        run_eval(_cfg(tmp_path, data), generator=FakeGenerator())


# --------------------------------------------------------------------------------------------
# 2. method arguments may not override the swept axis, nor name a method that does not run
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method_args, match", [
    ({"hired": {"budget": 0.9}}, r"'budget'.*--budget"),
    ({"random": {"seed": 3}}, r"'seed'.*--seed"),
    ({"hiredd": {"alpha": 0.3}}, r"unknown method 'hiredd' in --method-args; valid methods: full, hired, random"),
    ({"random": {}}, r"'random'.*not in --method"),
    ({"full": {"budget": 0.5}}, r"full"),
])
def test_method_args_refused(tmp_path, method_args, match):
    data = make_easyvqa(tmp_path / "ev")
    gen = FakeGenerator()
    methods = ["random"] if "random" in method_args and method_args["random"] else ["hired"]
    with pytest.raises(ValueError, match=match):
        run_eval(_cfg(tmp_path, data, methods=methods, budgets=[0.2], method_args=method_args), generator=gen)
    assert gen.calls == [] and not (tmp_path / "out" / "run.json").exists()


def test_method_args_overriding_fastv_keep_and_pdrop_ratio_refused():
    with pytest.raises(ValueError, match=r"fastv.*'keep'.*--budget"):
        EvalConfig(tasks=["easyvqa"], out="o", methods=["fastv"], method_args={"fastv": {"keep": 0.5}})
    with pytest.raises(ValueError, match=r"pdrop.*'ratio'.*--budget"):
        EvalConfig(tasks=["easyvqa"], out="o", methods=["pdrop"], method_args={"pdrop": {"ratio": 0.5}})


def test_cli_method_args_override_is_a_usage_error(tmp_path, capsys):
    data = make_easyvqa(tmp_path / "ev")
    err = _cli_usage_error(capsys, ["--task", "easyvqa", "--data", str(data), "--method", "hired", "--budget", "0.2",
                                    "--method-args", '{"hired": {"budget": 0.9}}', "--out", str(tmp_path / "o"),
                                    "--model", "py:test_eval_reliability:model_must_not_load", "--no-progress"])
    assert "'budget'" in err
    err = _cli_usage_error(capsys, ["--task", "easyvqa", "--data", str(data), "--method", "hired",
                                    "--method-args", '{"hiredd": {"alpha": 0.3}}', "--out", str(tmp_path / "o"),
                                    "--no-progress"])
    assert "hiredd" in err and "valid methods:" in err


# --------------------------------------------------------------------------------------------
# 8. option ranges (and duplicates) are usage errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt, value, expected", [
    ("--limit", "0", "argument --limit: must be a whole number >= 1, got '0'"),
    ("--limit", "-1", "argument --limit: must be a whole number >= 1, got '-1'"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be a whole number >= 1, got '0'"),
    ("--batch-size", "0", "argument --batch-size: must be a whole number >= 1, got '0'"),
    ("--budget", "inf", "budget 'inf' is not a finite number"),
    ("--budget", "1e400", "budget '1e400' is not a finite number"),
    ("--budget", "nan", "budget 'nan' is not a finite number"),
    ("--budget", "-inf", "budget '-inf' is not a finite number"),
    ("--budget", "0.2,0.2", "lists budget 0.2 twice"),
    ("--budget", "64,64.0", "lists budget 64 twice"),
    ("--budget", ",", "argument --budget: no value given"),
    ("--method", "hired,hired", "lists method 'hired' twice"),
    ("--method", ",", "argument --method: no value given"),
    ("--task", "easyvqa,easy_vqa", "lists task 'easyvqa' twice"),
])
def test_cli_out_of_range_options(tmp_path, capsys, opt, value, expected):
    argv = ["--task", "easyvqa", "--out", str(tmp_path / "o"),
            "--model", "py:test_eval_reliability:model_must_not_load", "--no-progress"]
    if opt == "--task":
        argv[1] = value
    else:
        argv += [f"{opt}={value}"]  # (the = form lets a value start with "-")
    err = _cli_usage_error(capsys, argv)
    assert expected in err
    assert not (tmp_path / "o" / "run.json").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(limit=0), "limit=0"), (dict(limit=-1), "limit=-1"), (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(batch_size=0), "batch_size=0"), (dict(budgets=[float("inf")]), "inf"), (dict(budgets=[float("nan")]), "nan"),
    (dict(budgets=[0.2, 0.2]), "0.2.*twice"), (dict(methods=["random", "random"]), "random.*twice"),
    (dict(tasks=["easyvqa", "easy_vqa"]), "easyvqa.*twice"), (dict(budgets=[]), "budget"), (dict(methods=[]), "method"),
    (dict(limit=True), "limit=True"),
])
def test_eval_config_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(**{**dict(tasks=["easyvqa"], out="o"), **kw})


def test_budgets_that_print_alike_get_distinct_files(tmp_path):
    assert config_key("hired", 0.1234567) != config_key("hired", 0.1234568)
    assert config_key("hired", 1234567.0) != config_key("hired", 1234568.0)
    assert config_key("hired", 0.2) == "hired@0.2" and config_key("hired", 64.0) == "hired@64"  # unchanged names
    data = make_easyvqa(tmp_path / "ev")
    gen = FakeGenerator()
    run_eval(_cfg(tmp_path, data, budgets=[0.1234567, 0.1234568]), generator=gen)
    assert len(gen.calls) == 1 + 3 * 2  # both budgets really ran
    rows = load_results(tmp_path / "out" / "easyvqa", "random", 0.1234568)
    assert [r["budget"] for r in rows] == [0.1234568] * 2


# --------------------------------------------------------------------------------------------
# 9. every configuration is checked against the loaded model before the first sample
# --------------------------------------------------------------------------------------------
class CountingHF(HFGenerator):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.n_generate = 0

    def generate(self, prompts, images, max_new_tokens):
        self.n_generate += 1
        return super().generate(prompts, images, max_new_tokens)


@pytest.fixture(scope="module")
def three_layer_llava():
    from vlmdrop.testing import tiny_llava

    return tiny_llava(seed=3, text_layers=3)  # pdrop's default stages (8, 16, 24) do not fit: [1, 2] is chosen


@pytest.mark.parametrize("methods, method_args, match", [
    (["pdrop"], {"pdrop": {"layers": [1, 8]}}, r"pdrop@0\.5.*layers=8 is out of range.*3 decoder layers"),
    (["hired", "fastv"], {"fastv": {"layer": 5}}, r"fastv@0\.5.*layer=5 is out of range"),
    (["hired"], {"hired": {"alhpa": 0.3}}, r"hired@0\.5.*unknown parameter.*alhpa"),
])
def test_configurations_checked_on_the_model_before_any_sample(tmp_path, three_layer_llava, methods, method_args,
                                                               match):
    data = make_easyvqa(tmp_path / "ev")
    gen = CountingHF(*three_layer_llava)
    with pytest.raises(ValueError, match=match):
        run_eval(_cfg(tmp_path, data, methods=methods, method_args=method_args), generator=gen)
    assert gen.n_generate == 0 and gen.handle is None  # no sample ran, the model is left unmodified
    assert "_vlmdrop_handle" not in three_layer_llava[0].__dict__
    assert not (tmp_path / "out" / "easyvqa").exists() and not (tmp_path / "out" / "run.json").exists()


def test_pdrop_count_budget_is_refused_before_any_sample(tmp_path, three_layer_llava):
    data = make_easyvqa(tmp_path / "ev")
    gen = CountingHF(*three_layer_llava)
    with pytest.raises(ValueError, match=r"pdrop@64 cannot be applied.*PyramidDrop takes a fraction"):
        run_eval(_cfg(tmp_path, data, methods=["pdrop"], budgets=[64]), generator=gen)
    assert gen.n_generate == 0 and gen.handle is None


def test_llm_stage_defaults_follow_the_model_depth(tmp_path, three_layer_llava):
    """On a 3-layer LM (not the embedded model: a LLaVA-1.5 of another seed) pdrop's stages and FastV's layer
    come from the depth, in the run record and every row, and the budget is what is left after the last drop."""
    data = make_easyvqa(tmp_path / "ev")
    run_eval(_cfg(tmp_path, data, methods=["fastv", "pdrop"], budgets=[0.25], max_new_tokens=1),
             generator=HFGenerator(*three_layer_llava))
    record = json.loads((tmp_path / "out" / "run.json").read_text())["configs"]
    assert record["pdrop@0.25"] == {"ratio": 0.5, "layers": [1, 2]} and record["fastv@0.25"] == {"keep": 0.25,
                                                                                                  "layer": 1}
    for m in ("fastv", "pdrop"):
        rows = load_results(tmp_path / "out" / "easyvqa", m, 0.25)
        assert rows and all(r["params"] == record[f"{m}@0.25"] for r in rows)
        assert all(r["n_kept"] == round(0.25 * r["n_before"]) for r in rows), rows


# --------------------------------------------------------------------------------------------
# 10. error rows are retried on resume
# --------------------------------------------------------------------------------------------
def test_error_rows_rerun_after_the_image_is_added(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    qs = json.loads((data / "questions.json").read_text()) + [["what is the red shape?", "circle", 7]]
    (data / "questions.json").write_text(json.dumps(qs))
    cfg = _cfg(tmp_path, data, methods=["hired"], budgets=[0.5])
    run_eval(cfg, generator=FakeGenerator(default="circle"))
    d = tmp_path / "out" / "easyvqa"
    assert "missing image" in load_results(d, "hired", 0.5)[2]["error"]
    assert "## Errors (2)" in (d / "report.md").read_text()
    img(data / "images" / "7.png")
    again = FakeGenerator(default="circle")
    run_eval(cfg, generator=again)
    assert len(again.calls) == 1 + 2  # warm-up + sample 2 in full and hired@0.5; finished rows not redone
    for m, b in (("full", 1.0), ("hired", 0.5)):
        rows = {r["id"]: r for r in load_results(d, m, b)}
        assert sorted(rows) == ["0", "1", "2"] and rows["2"]["error"] is None and rows["2"]["score"] == 1.0
    md = (d / "report.md").read_text()
    assert "## Errors (0)" in md and "| hired | 0.5 | 66.67 |" in md and "| 3 | 0 |" in md
    third = FakeGenerator()
    run_eval(cfg, generator=third)  # nothing left to do
    assert third.calls == []


# --------------------------------------------------------------------------------------------
# 11. the run record is written only once samples exist
# --------------------------------------------------------------------------------------------
def test_failed_data_leaves_no_run_record(tmp_path):
    from vlmdrop.eval.tasks import EmptyDatasetError

    (tmp_path / "wrong").mkdir()
    with pytest.raises(EmptyDatasetError):
        run_eval(_cfg(tmp_path, tmp_path / "wrong"), generator=FakeGenerator())
    assert not (tmp_path / "out" / "run.json").exists()
    data = make_easyvqa(tmp_path / "ev")
    gen = FakeGenerator()
    run_eval(_cfg(tmp_path, data), generator=gen)  # the corrected command on the same --out
    assert len(gen.calls) == 1 + 2 * 2
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data"] == str(data.resolve())


def test_results_without_run_record_are_refused(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    run_eval(_cfg(tmp_path, data), generator=FakeGenerator())
    (tmp_path / "out" / "run.json").unlink()
    with pytest.raises(ValueError, match="no run.json"):
        run_eval(_cfg(tmp_path, data, seed=5), generator=FakeGenerator())


# --------------------------------------------------------------------------------------------
# 12. JSON lines that are not result objects are set aside like corrupt lines
# --------------------------------------------------------------------------------------------
def test_non_result_lines_are_counted_and_reported(tmp_path):
    data = make_easyvqa(tmp_path / "ev")
    cfg = _cfg(tmp_path, data, methods=["hired"], budgets=[0.5])
    run_eval(cfg, generator=FakeGenerator())
    part = tmp_path / "out" / "easyvqa" / "full@1.part0.jsonl"
    first, second = part.read_text().splitlines()
    wrong_config = json.dumps({**json.loads(second), "method": "random", "budget": 0.5})
    part.write_text("\n".join([first, "123", "null", "{}", '{"answer": "yes"}', '["1"]', wrong_config,
                               '{"id": 1, "error": null}']) + "\n")
    assert len(read_jsonl(part)) == 5  # read_jsonl returns the JSON objects only (not 123, null, ["1"])
    again = FakeGenerator()
    run_eval(cfg, generator=again)  # must not crash
    assert len(again.calls) == 1 + 1  # warm-up + sample 1 of the full model (its line was not a result)
    assert sorted(r["id"] for r in load_results(part.parent, "full", 1.0)) == ["0", "1"]
    md = (part.parent / "report.md").read_text()
    assert "## Corrupt result lines (7)" in md
    assert "`full@1.part0.jsonl` line 2: not a result object: 123" in md
    assert "`full@1.part0.jsonl` line 5: not a result object: {\"answer\": \"yes\"}" in md
    assert "`full@1.part0.jsonl` line 7: a result of random@0.5, not of full@1" in md
    assert part.read_text().count("\n") == 9  # kept in the file (set aside, not deleted)


# --------------------------------------------------------------------------------------------
# 13. an unusable --out is a usage error before the model loads
# --------------------------------------------------------------------------------------------
def _argv(data, out):
    return ["--task", "easyvqa", "--data", str(data), "--method", "hired", "--out", str(out),
            "--model", "py:test_eval_reliability:model_must_not_load", "--no-progress"]


def test_out_is_a_file_or_under_a_file(tmp_path, capsys):
    data = make_easyvqa(tmp_path / "ev")
    f = tmp_path / "afile"
    f.write_text("x")
    assert "is a file" in _cli_usage_error(capsys, _argv(data, f))
    assert "cannot be created" in _cli_usage_error(capsys, _argv(data, f / "sub"))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "easyvqa").write_text("x")  # the task's result folder is a file
    assert "easyvqa" in _cli_usage_error(capsys, _argv(data, tmp_path / "o"))


def test_out_read_only(tmp_path, capsys):
    data = make_easyvqa(tmp_path / "ev")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        try:
            (ro / "probe").write_text("x")
            (ro / "probe").unlink()
            pytest.skip("this user (root) can still write into a read-only folder")
        except PermissionError:
            pass
        assert "not writable" in _cli_usage_error(capsys, _argv(data, ro))
    finally:
        os.chmod(ro, 0o755)


def test_out_on_a_read_only_file_system(tmp_path, capsys):
    import tempfile
    from pathlib import Path

    ro = Path("/sys")  # read-only even for root in most containers
    try:
        fd, probe = tempfile.mkstemp(dir=ro)
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    data = make_easyvqa(tmp_path / "ev")
    assert "/sys is not writable" in _cli_usage_error(capsys, _argv(data, ro))
