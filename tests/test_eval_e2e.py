"""End-to-end: the real embedded model on an easy-VQA slice (2 methods x 2 budgets), the CLI killed
and restarted, and ``accelerate launch`` with 2 CPU processes merging into one report."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")

from vlmdrop.eval.backend import HFGenerator  # noqa: E402
from vlmdrop.eval.results import read_jsonl  # noqa: E402
from vlmdrop.eval.runner import EvalConfig, run_eval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_easyvqa_two_methods_two_budgets(tmp_path):
    from vlmdrop.zoo import load_default

    model, processor = load_default()
    gen = HFGenerator(model, processor)
    cfg = EvalConfig(tasks=["easyvqa"], out=str(tmp_path / "out"), methods=["hired", "random"], budgets=[0.1, 0.5],
                     limit=4, batch_size=2, max_new_tokens=3, progress=False)
    paths = run_eval(cfg, generator=gen)
    out = tmp_path / "out" / "easyvqa"
    full = read_jsonl(out / "full@1.part0.jsonl")
    assert len(full) == 4 and all(r["n_kept"] == r["n_before"] > 0 for r in full)
    for method in ("hired", "random"):
        lo = read_jsonl(out / f"{method}@0.1.part0.jsonl")
        hi = read_jsonl(out / f"{method}@0.5.part0.jsonl")
        assert len(lo) == len(hi) == 4
        for a, b in zip(lo, hi):
            assert a["n_before"] == b["n_before"]
            assert 0 < a["n_kept"] < b["n_kept"] < b["n_before"]
            assert a["ttft_s"] > 0 and a["peak_mem_mb"] > 0 and isinstance(a["answer"], str)
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[0]["method"] == "full"
    assert (out / "pareto.png").exists() and paths["easyvqa"].exists()
    # model restored after the sweep
    assert gen.handle is None


def test_cli_killed_and_restarted_resumes(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "vlmdrop.eval", "--task", "easyvqa", "--limit", "8", "--method", "hired",
            "--budget", "0.2", "--max-new-tokens", "2", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    part = out / "easyvqa" / "full@1.part0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if part.exists() and len(read_jsonl(part)) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read().decode())
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = len(read_jsonl(part))
    assert 3 <= k < 8
    res = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    for key in ("full@1", "hired@0.2"):
        ids = [r["id"] for r in read_jsonl(out / "easyvqa" / f"{key}.part0.jsonl")]
        assert sorted(ids, key=int) == [str(i) for i in range(8)], (key, ids)  # no loss, no repeat
    assert "| hired | 0.2 |" in res.stdout


def test_cli_errors_list_valid_names(tmp_path):
    from vlmdrop.eval.cli import cli

    assert cli(["--task", "nope", "--out", str(tmp_path)]) == 2
    assert cli(["--task", "easyvqa", "--method", "bogus", "--limit", "1", "--out", str(tmp_path / "o"),
                "--model", "py:eval_fixtures:FakeGenerator"]) == 2


def test_cli_reports_unknown_names(tmp_path, capsys):
    from vlmdrop.eval.cli import cli

    cli(["--task", "nope", "--out", str(tmp_path)])
    assert "valid tasks:" in capsys.readouterr().err
    cli(["--task", "easyvqa", "--method", "bogus", "--limit", "1", "--out", str(tmp_path / "o"),
         "--model", "py:eval_fixtures:FakeGenerator"])
    assert "valid methods: full, hired, random" in capsys.readouterr().err


def test_accelerate_two_cpu_processes_merge(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    # on a machine without GPUs, `--multi_gpu` starts torchrun-style processes that use gloo on CPU
    # (`--cpu` alone starts a single process)
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "vlmdrop.eval", "--task", "easyvqa", "--limit", "6", "--method", "random", "--budget", "0.3",
            "--max-new-tokens", "2", "--out", str(out), "--no-progress"]
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a GPU machine
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d = out / "easyvqa"
    parts = sorted(p.name for p in d.glob("random@0.3.part*.jsonl"))
    assert parts == ["random@0.3.part0.jsonl", "random@0.3.part1.jsonl"]
    ids0 = [r["id"] for r in read_jsonl(d / parts[0])]
    ids1 = [r["id"] for r in read_jsonl(d / parts[1])]
    assert ids0 == ["0", "2", "4"] and ids1 == ["1", "3", "5"]
    with open(d / "report.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["random"]["n"] == "6" and rows["full"]["n"] == "6"


def test_cli_model_from_a_checkpoint_folder(tmp_path, capsys):
    from vlmdrop.eval.cli import cli
    from vlmdrop.testing import tiny_llava

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    rc = cli(["--model", str(tmp_path / "ckpt"), "--task", "easyvqa", "--limit", "2", "--method", "hired",
              "--budget", "0.25", "--max-new-tokens", "2", "--batch-size", "2", "--out", str(tmp_path / "o"),
              "--no-progress"])
    assert rc == 0
    rows = read_jsonl(tmp_path / "o" / "easyvqa" / "hired@0.25.part0.jsonl")
    assert len(rows) == 2 and all(r["n_kept"] < r["n_before"] for r in rows)
    assert "| hired | 0.25 |" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cli_qwen_checkpoint_folder(family, tmp_path, capsys):
    from conftest import get_model

    from vlmdrop.eval.cli import cli

    model, processor = get_model(family)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    rc = cli(["--model", str(tmp_path / "ckpt"), "--task", "easyvqa", "--limit", "2", "--method", "hired,fastv",
              "--budget", "0.25", "--max-new-tokens", "2", "--batch-size", "2", "--out", str(tmp_path / "o"),
              "--no-progress"])
    assert rc == 0
    for method in ("hired", "fastv"):
        rows = read_jsonl(tmp_path / "o" / "easyvqa" / f"{method}@0.25.part0.jsonl")
        assert len(rows) == 2 and all(r["n_kept"] == max(1, round(0.25 * r["n_before"])) for r in rows), rows
    assert "| hired | 0.25 |" in capsys.readouterr().out


def test_llm_stage_methods_take_their_budget_parameter(tmp_path, capsys):
    from vlmdrop.eval.cli import cli
    from vlmdrop.eval.params import method_params

    assert method_params("hired", 0.2) == {"budget": 0.2}
    assert method_params("hired", 64.0) == {"budget": 64}
    assert method_params("fastv", 0.25, extra={"layer": 1}) == {"keep": 0.25, "layer": 1}
    assert method_params("pdrop", 0.5) == {"ratio": 0.5 ** (1 / 3)}  # the default 3 stages leave 0.5
    assert method_params("pdrop", 0.5, extra={"layers": [2, 4]}) == {"ratio": 0.5 ** (1 / 2), "layers": [2, 4]}
    assert method_params("random", 0.1, seed=3) == {"budget": 0.1, "seed": 3}
    # with the LM's depth: the depth defaults where the caller gives none
    assert method_params("pdrop", 0.1, num_layers=3) == {"ratio": 0.1 ** 0.5, "layers": [1, 2]}
    assert method_params("fastv", 0.1, num_layers=3) == {"keep": 0.1, "layer": 1}
    assert method_params("fastv", 0.1, num_layers=3, extra={"layer": 2}) == {"keep": 0.1, "layer": 2}
    assert method_params("fastv", 0.1, num_layers=32) == {"keep": 0.1}
    with pytest.raises(ValueError, match="keep=0.5.*budget=0.1"):
        method_params("fastv", 0.1, extra={"keep": 0.5})
    with pytest.raises(ValueError, match="PyramidDrop takes a fraction"):
        method_params("pdrop", 64.0)
    import vlmdrop

    if "fastv" not in vlmdrop.methods():
        pytest.skip("fastv not in this vlmdrop")
    rc = cli(["--task", "easyvqa", "--limit", "2", "--method", "fastv", "--budget", "0.25",
              "--method-args", '{"fastv": {"layer": 1}}', "--max-new-tokens", "2", "--out", str(tmp_path / "o"),
              "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = read_jsonl(tmp_path / "o" / "easyvqa" / "fastv@0.25.part0.jsonl")
    assert len(rows) == 2 and all(r["n_kept"] == round(0.25 * r["n_before"]) for r in rows)


def test_llm_stage_methods_on_the_embedded_model_as_zoo_evaluate_runs_them(tmp_path, capsys):
    """`vlmdrop eval --method pdrop` on the embedded LM (5 layers) failed with layers=8; it now runs with the
    parameters `python -m vlmdrop.zoo.evaluate` uses there (its published table): FastV at layer 1, PyramidDrop at
    layers 1, 3 and 4 keeping budget ** (1/3) at each, so that budget is what is left."""
    from vlmdrop.eval.cli import cli

    rc = cli(["--task", "easyvqa", "--limit", "2", "--method", "fastv,pdrop", "--budget", "0.1",
              "--max-new-tokens", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["configs"] == {"full@1": {}, "fastv@0.1": {"keep": 0.1, "layer": 1},
                                 "pdrop@0.1": {"ratio": 0.1 ** (1 / 3), "layers": [1, 3, 4]}}
    for key in ("fastv@0.1", "pdrop@0.1"):
        rows = read_jsonl(tmp_path / "o" / "easyvqa" / f"{key}.part0.jsonl")
        assert len(rows) == 2 and all(r["params"] == record["configs"][key] for r in rows)
        assert all(r["n_kept"] == round(0.1 * r["n_before"]) for r in rows), rows
