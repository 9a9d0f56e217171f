"""The lmms-eval plug-in through lmms-eval's real CLI, on a local save_to_disk POPE-format task.

Skipped only where lmms-eval is not installed at all. A plain ``pip install lmms-eval`` pulls some 80
packages (wandb, opencv, ...) and, next to the quick start's torch 2.13.0, replaces torch by 2.14.1 with
the CUDA wheels; `.ci/run` installs it with ``--no-deps`` after the few packages its CLI imports, and sets
``VLMDROP_REQUIRE_LMMS_EVAL=1`` so that there a missing lmms-eval fails instead of skipping). An
lmms-eval that is installed but cannot import is a failure, not a skip."""

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("VLMDROP_REQUIRE_LMMS_EVAL") == "1":
        raise RuntimeError("VLMDROP_REQUIRE_LMMS_EVAL=1 but lmms_eval is not installed in " + sys.prefix)
    pytest.skip("lmms-eval is not installed (see .ci/run for an install that leaves torch alone)",
                allow_module_level=True)
datasets = pytest.importorskip("datasets")

PLUGIN = "vlmdrop.eval.lmms_plugin:manifest"
TESTS = Path(__file__).resolve().parent

TASK_YAML = """dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
task: "vlmdrop_pope_local"
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""


def test_lmms_eval_cli_with_vlmdrop_model(tmp_path):
    from PIL import Image

    ims = [Image.new("RGB", (60, 50), c) for c in ("red", "blue", "green", "white")]
    ds = datasets.Dataset.from_dict({
        "question_id": [str(i) for i in range(4)], "question": ["is there a red circle ?"] * 4,
        "answer": ["yes", "no", "no", "yes"], "category": ["random"] * 4, "image": ims,
    }).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "data"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("from lmms_eval.tasks.pope.utils import *  # noqa\n")
    (tasks / "vlmdrop_pope_local.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    env = dict(os.environ)
    paths = [str(TESTS)]
    installed = [e.value for e in entry_points(group="lmms_eval.models") if e.name == "vlmdrop"]
    if not installed:  # a checkout that is not pip-installed: the entry point as pyproject.toml declares it
        ep = tmp_path / "ep" / "vlmdrop_lmms_ep-0.0.dist-info"
        ep.mkdir(parents=True)
        (ep / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmdrop-lmms-ep\nVersion: 0.0\n")
        (ep / "entry_points.txt").write_text(f"[lmms_eval.models]\nvlmdrop = {PLUGIN}\n")
        paths.insert(0, str(tmp_path / "ep"))
    else:  # the installed package's own entry point (pyproject [project.entry-points."lmms_eval.models"])
        assert installed == [PLUGIN], installed
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "vlmdrop", "--model_args",
                          "method=hired,budget=0.2", "--tasks", "vlmdrop_pope_local", "--include_path", str(tasks),
                          "--output_path", str(tmp_path / "out"), "--batch_size", "1"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "vlmdrop_pope_local" in res.stdout and "pope_accuracy" in res.stdout
    # lmms-eval's own results file: our model class ran HiRED on all 4 samples
    (results,) = (tmp_path / "out").rglob("*results.json")
    out = json.loads(results.read_text())
    assert out["config"]["model_args"] == "method=hired,budget=0.2"
    assert "VlmdropLMMS" in out["config"]["model_backend"], out["config"]["model_backend"]
    assert out["n-samples"]["vlmdrop_pope_local"]["effective"] == 4
    assert 0.0 <= out["results"]["vlmdrop_pope_local"]["pope_accuracy,none"] <= 1.0
