import subprocess
import sys

import pytest
import torch

import vlmdrop
from vlmdrop.cli import main

from conftest import MIXED_SIZES, batch, get_model


def test_cli_run_on_embedded_default(capsys):
    assert main(["run", "--method", "hired", "--budget", "0.2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "embedded default" in out and "kept per crop (base image first)" in out
    n_before = int(out.split("full     (")[1].split(" ")[0])
    n_kept = int(out.split("hired    (")[1].split(" ")[0])
    assert n_kept == round(0.2 * n_before)
    # the bundled sample is a held-out easyvqa-hr canvas with a green circle; the trained model names it
    full_line = [line for line in out.splitlines() if line.startswith("full ")][0]
    hired_line = [line for line in out.splitlines() if line.startswith("hired ")][0]
    assert full_line.endswith("'circle'") and hired_line.endswith("'circle'"), out


def test_cli_run_with_model_folder_and_image(tmp_path, capsys):
    from conftest import make_image

    model, proc = get_model("llava")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    make_image(80, 120).save(tmp_path / "img.png")
    rc = main(["run", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"), "--question",
               "what color ?", "--method", "random", "--budget", "5", "--params", '{"seed": 1}',
               "--max-new-tokens", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "random   (5 visual tokens" in out and "(16 visual tokens" in out


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        main(["run", "--method", "nope"])


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "vlmdrop", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--budget" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generate_matches_counts():
    model, proc = get_model("llava_next")
    model = model.to("cuda")
    try:
        inputs = batch(proc, MIXED_SIZES).to("cuda")
        with torch.no_grad(), vlmdrop.dropping(model, "hired", budget=0.2) as h:
            out = model.generate(**inputs, max_new_tokens=3)
        assert out.is_cuda and all(s.n_kept == round(0.2 * s.n_before) for s in h.stats.images)
    finally:
        model.to("cpu")
