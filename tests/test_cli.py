import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import MIXED_SIZES, batch, get_model, make_image
from PIL import Image

import vlmdrop
import vlmdrop.cli as cli
from vlmdrop.cli import main
from vlmdrop.eval.params import depth_defaults, method_params
from vlmdrop.testing import tiny_llava_next


def test_cli_run_on_embedded_default(capsys):
    assert main(["run", "--method", "hired", "--budget", "0.2", "--max-new-tokens", "3", "--repeat", "1"]) == 0
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
    model, proc = get_model("llava")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    make_image(80, 120).save(tmp_path / "img.png")
    rc = main(["run", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"), "--question",
               "what color ?", "--method", "random", "--budget", "5", "--params", '{"seed": 1}',
               "--max-new-tokens", "2", "--repeat", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "random   (5 visual tokens" in out and "(16 visual tokens" in out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cli_run_with_a_qwen_checkpoint_folder(family, tmp_path, capsys):
    """A saved Qwen2.5-VL / Qwen3-VL checkpoint (as Qwen/Qwen2.5-VL-3B-Instruct loads): its processor's chat
    template, a vision-stage and an LLM-stage method."""
    model, proc = get_model(family)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    make_image(80, 120).save(tmp_path / "img.png")  # resized to 80x128 px: a 5x8 grid of 40 LLM tokens
    for method, budget, kept in (("hired", "0.25", 10), ("fastv", "0.5", 20)):
        rc = main(["run", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"), "--question",
                   "what color ?", "--method", method, "--budget", budget, "--max-new-tokens", "2", "--repeat", "1"])
        assert rc == 0
        out = capsys.readouterr().out
        assert "full     (40 visual tokens" in out and f"{method:<8} ({kept} visual tokens" in out, out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "vlmdrop", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--budget" in r.stdout and "--repeat" in r.stdout
    assert "round(L/4), round(L/2), round(3L/4)" in " ".join(r.stdout.split())  # the pdrop layer rule


# --------------------------------------------------------------------------------------
# user errors: one line on stderr, exit 2; before the model loads where the model is not needed
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_image(40, 60).save(d / "ok.png")
    data = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.png").write_text("not an image\n")
    Image.new("1", (20000, 20000)).save(d / "bomb.png")  # 48 KB on disk, 400 M pixels decoded
    (d / "ckpt-file").write_text("{}")
    (d / "empty-folder").mkdir()
    return d


def _one_error_line(capsys, *needles: str) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("vlmdrop run: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert cap.out == ""
    return lines[0]


PRE_LOAD_ERRORS = {
    "budget-above-1": (["--budget", "1.5"], ["'1.5'", "(0, 1]"]),
    "budget-zero": (["--budget", "0"], ["'0'"]),
    "budget-word": (["--budget", "abc"], ["'abc'", "not a number"]),
    "budget-nan": (["--budget", "nan"], ["'nan'"]),
    "budget-negative": (["--budget", "-0.2"], ["'-0.2'"]),
    "image-missing": (["--image", "{d}/absent.png"], ["absent.png", "no such file"]),
    "image-folder": (["--image", "{d}"], ["not a file"]),
    "image-not-an-image": (["--image", "{d}/notes.png"], ["notes.png", "not an image"]),
    "image-truncated": (["--image", "{d}/truncated.png"], ["truncated.png", "truncated"]),
    "image-bomb": (["--image", "{d}/bomb.png"], ["bomb.png", "400000000 pixels"]),
    "params-not-json": (["--params", "{alpha: 0.3}"], ["{alpha: 0.3}", "not valid JSON"]),
    "params-not-object": (["--params", "[0.3]"], ["[0.3]", "JSON object"]),
    "params-unknown": (["--params", '{"alpah": 0.3}'], ["alpah", "valid parameters"]),
    "params-invalid": (["--params", '{"alpha": 2}'], ["alpha=2"]),
    "params-budget-pdrop-count": (["--method", "pdrop", "--budget", "64"], ["budget=64", "PyramidDrop", "fraction"]),
    # --params may not set what --budget sets (the run would say one budget while another ran)
    "params-and-budget-fastv-keep": (["--method", "fastv", "--budget", "0.2", "--params", '{"keep": 0.5}'],
                                     ["keep=0.5", "budget=0.2"]),
    "params-and-budget-hired": (["--budget", "0.2", "--params", '{"budget": 0.5}'], ["budget=0.5", "budget=0.2"]),
    "method-unknown": (["--method", "nope"], ["'nope'", "valid methods"]),
    "method-two-vision": (["--method", "hired,random"], ["vision-stage"]),
    "method-stack-flat-params": (["--method", "hired,fastv", "--params", '{"alpha": 0.3}'], ["alpha"]),
    "model-missing-folder": (["--model", "{d}/no-such-ckpt"], ["no-such-ckpt", "no such folder"]),
    "model-file": (["--model", "{d}/ckpt-file"], ["ckpt-file", "is a file"]),
    "model-folder-not-checkpoint": (["--model", "{d}/empty-folder"], ["empty-folder", "config.json"]),
    "model-hub-id-offline": (["--model", "nobody/not-cached-model"], ["nobody/not-cached-model", "cache"]),
    "repeat-zero": (["--repeat", "0"], ["--repeat 0"]),
}


@pytest.mark.parametrize("case", list(PRE_LOAD_ERRORS))
def test_run_user_errors_before_loading(case, bad_files, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a user error")

    monkeypatch.setattr(cli, "load_model", no_load)
    argv, needles = PRE_LOAD_ERRORS[case]
    assert main(["run", *[a.replace("{d}", str(bad_files)) for a in argv]]) == 2
    _one_error_line(capsys, *needles)


@pytest.fixture(scope="module")
def deep_next():
    """A LLaVA-NeXT with a 6-layer LM (the fixtures have 2, the embedded model 3)."""
    return tiny_llava_next(text_layers=6)


def _serve(monkeypatch, model, proc, calls=None):
    """Make `vlmdrop run` use (model, proc); record per generate call whether a method is applied."""

    def load(*a, **k):
        return model, proc

    monkeypatch.setattr(cli, "load_model", load)
    if calls is not None:
        real = type(model).generate

        def generate(*a, **k):
            h = model.__dict__.get("_vlmdrop_handle")
            calls.append("reduced" if h is not None and h.active else "full")
            return real(model, *a, **k)

        monkeypatch.setattr(model, "generate", generate)


@pytest.mark.parametrize("params", ['{"layers": [1, 6]}', '{"ratio": [0.5, 0.5]}'])
def test_run_model_dependent_error_after_load_before_generate(params, deep_next, monkeypatch, capsys):
    model, proc = deep_next
    calls: list[str] = []
    _serve(monkeypatch, model, proc, calls)
    assert main(["run", "--method", "pdrop", "--params", params]) == 2
    _one_error_line(capsys, "pdrop", "layers")
    assert calls == [] and "_vlmdrop_handle" not in model.__dict__  # nothing generated, nothing left applied


def test_run_model_that_fails_to_load(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert main(["run", "--model", str(tmp_path / "ckpt")]) == 2
    _one_error_line(capsys, "cannot be loaded")


# --------------------------------------------------------------------------------------
# --budget for every method, mapped as vlmdrop eval maps it; defaults that fit the model
# --------------------------------------------------------------------------------------
def test_depth_defaults_rule():
    """The one rule (the methods' configs, through vlmdrop.eval.params): {} where it gives the default."""
    layers = {n: depth_defaults("pdrop", n).get("layers") for n in (1, 2, 3, 4, 6, 24, 32, 40)}
    assert layers == {1: None, 2: [1], 3: [1, 2], 4: [1, 2, 3], 6: [2, 3, 5], 24: [6, 12, 18], 32: None,
                      40: [10, 20, 30]}
    fastv = {n: depth_defaults("fastv", n).get("layer") for n in (2, 3, 5, 6, 32, 40)}
    assert fastv == {2: 1, 3: 1, 5: 1, 6: None, 32: None, 40: None}  # 2 (the paper's), within the first third
    assert depth_defaults("hired", 3) == {}


def _tokens(out: str, label: str) -> int:
    return int(re.search(rf"^{re.escape(label)} +\((\d+) visual tokens\)", out, re.M).group(1))


def _config_line(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith("method:")][0]


@pytest.mark.parametrize("method", sorted(vlmdrop.methods()))
def test_run_budget_for_every_method(method, deep_next, monkeypatch, capsys):
    model, proc = deep_next
    _serve(monkeypatch, model, proc)
    assert main(["run", "--method", method, "--budget", "0.25", "--max-new-tokens", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    cfg = _config_line(out)
    for k, v in method_params(method, 0.25, num_layers=6).items():  # the eval harness' mapping
        v = tuple(v) if isinstance(v, list) else v
        assert f"{k}={v!r}" in cfg, (k, v, cfg)
    n_before, n_kept = _tokens(out, "full"), _tokens(out, method)
    layer_tokens = re.search(r"image tokens per LLM layer: (\[.*\])", out)
    assert n_kept == round(0.25 * n_before), out  # the budget is what is left, for every method
    if method == "pdrop":  # 6 layers: stages at 2, 3, 5, each keeping 0.25 ** (1/3) of the tokens present
        assert "layers=(2, 3, 5)" in cfg and f"ratio={0.25 ** (1 / 3)!r}" in cfg and "from the 6-layer LM" in cfg
        frac = [1.0]
        for _ in range(3):
            frac.append(frac[-1] * 0.25 ** (1 / 3))
        n = [round(n_before * f) for f in frac]  # stage s keeps round(n * r_0 * ... * r_s)
        assert json.loads(layer_tokens.group(1)) == [n[0]] * 2 + [n[1]] + [n[2]] * 2 + [n[3]]
    if method == "fastv":  # the method's own layer 2 on a 6-layer LM
        assert json.loads(layer_tokens.group(1)) == [n_before] * 2 + [n_kept] * 4


@pytest.fixture(scope="module")
def embedded():
    from vlmdrop.zoo import load_default

    return load_default()


@pytest.mark.parametrize("method", sorted(vlmdrop.methods()))
def test_run_default_parameters_on_embedded_model(method, embedded, monkeypatch, capsys):
    _serve(monkeypatch, *embedded)
    assert main(["run", "--method", method, "--max-new-tokens", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    if method == "pdrop":
        # the paper's 8/16/24 of 32 layers scaled to the embedded 5-layer LM
        assert "layers=(1, 3, 4)" in _config_line(out) and "from the 5-layer LM" in _config_line(out)
    if method == "fastv":  # the paper's layer 2 moved into the first third of the 5-layer LM, as zoo.evaluate runs it
        assert "layer=1," in _config_line(out) and "from the 5-layer LM" in _config_line(out)


def test_run_stack(deep_next, monkeypatch, capsys):
    model, proc = deep_next
    _serve(monkeypatch, model, proc)
    assert main(["run", "--method", "hired,fastv", "--budget", "0.5", "--params", '{"fastv": {"layer": 3}}',
                 "--max-new-tokens", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    n_before, n_kept = _tokens(out, "full"), _tokens(out, "hired+fastv")
    n_hired = round(0.5 * n_before)
    assert n_kept == round(0.5 * n_hired)
    tokens = json.loads(re.search(r"image tokens per LLM layer: (\[.*\])", out).group(1))
    assert tokens == [n_hired] * 3 + [n_kept] * 3


# --------------------------------------------------------------------------------------
# timing: warm-up, interleaved repeats, medians
# --------------------------------------------------------------------------------------
def test_run_warms_up_interleaves_and_prints_medians(deep_next, monkeypatch, capsys):
    model, proc = deep_next
    calls: list[str] = []
    _serve(monkeypatch, model, proc, calls)
    real = cli._generate
    fake = {"full": iter([9.0, 1.0, 5.0, 3.0]), "reduced": iter([9.0, 0.2, 0.6, 0.4])}

    def timed(*a, **k):  # the real generate, with made-up times: warm-up 9 s, then the listed ones
        t = real(*a, **k)
        t.ttft = next(fake[calls[-1]])
        t.total = 2 * t.ttft
        return t

    monkeypatch.setattr(cli, "_generate", timed)
    assert main(["run", "--method", "hired", "--budget", "0.3", "--max-new-tokens", "2", "--repeat", "3"]) == 0
    assert calls == ["full", "reduced",  # warm-up
                     "full", "reduced", "reduced", "full", "full", "reduced"]
    out = capsys.readouterr().out
    assert "median of 3 interleaved runs after one warm-up each" in out
    full = re.search(r"^  full +([\d.]+) s +([\d.]+) s", out, re.M)
    red = re.search(r"^  hired +([\d.]+) s +([\d.]+) s", out, re.M)
    assert (float(full.group(1)), float(full.group(2))) == (3.0, 6.0)
    assert (float(red.group(1)), float(red.group(2))) == (0.4, 0.8)
    assert "time to first token 0.13, generate 0.13" in out


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
