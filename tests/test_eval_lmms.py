"""The lmms-eval plug-in through lmms-eval's real CLI, on a local save_to_disk POPE-format task.

Skipped where lmms-eval is not importable (its full install pulls another torch; see
NOTES-eval.md for how it was run here: lmms-eval installed with --no-deps into a separate
folder on PYTHONPATH)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

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
    # the entry point as an installed vlmdrop declares it (pyproject [project.entry-points."lmms_eval.models"])
    ep = tmp_path / "ep" / "vlmdrop_lmms_ep-0.0.dist-info"
    ep.mkdir(parents=True)
    (ep / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmdrop-lmms-ep\nVersion: 0.0\n")
    (ep / "entry_points.txt").write_text("[lmms_eval.models]\nvlmdrop = vlmdrop.eval.lmms_plugin:manifest\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "ep"), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "vlmdrop", "--model_args",
                          "method=hired,budget=0.2", "--tasks", "vlmdrop_pope_local", "--include_path", str(tasks),
                          "--output_path", str(tmp_path / "out"), "--batch_size", "1"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "vlmdrop_pope_local" in res.stdout and "pope_accuracy" in res.stdout
