"""`vlmdrop bench`: the records it prints carry the fields of issue 13, with consistent values."""

import json
import math

import pytest

from vlmdrop.bench import FIELDS, SHAPES, build
from vlmdrop.cli import main

MEASURED = ("prefill_s_full", "prefill_s", "ideal_s", "speedup", "fraction_of_ideal", "decode_tps_full",
            "decode_tps")


def _bench(capsys, *argv: str) -> list[dict]:
    assert main(["bench", "--quick", "--json", "--shapes", "tiny", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_quick_json_records(capsys):
    recs = _bench(capsys, "--methods", "hired,fastv", "--budgets", "0.2,0.4", "--repeat", "2")
    assert [(r["method"], r["budget"]) for r in recs] == [("hired", 0.2), ("hired", 0.4), ("fastv", 0.2),
                                                          ("fastv", 0.4)]
    for r in recs:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert r["shape"] == "tiny" and r["n_before"] == 16
        assert r["n_kept"] == round(r["budget"] * 16), r
        for k in MEASURED:
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])
        assert r["speedup"] == pytest.approx(r["prefill_s_full"] / r["prefill_s"])
        assert r["fraction_of_ideal"] == pytest.approx(r["ideal_s"] / r["prefill_s"])
        assert r["overhead_pct"] == pytest.approx(100 * (r["prefill_s"] - r["ideal_s"]) / r["prefill_s"])
        assert r["lm_s_full"] > 0 and r["vision_s_full"] > 0 and r["vision_s"] > 0 and r["lm_s"] > 0
        # HiRED scores in the vision stage; FastV has no vision-stage score (null, never a number)
        assert (r["score_pct_of_vision"] is None) == (r["method"] == "fastv"), r
        # the method's own scoring, timed on its real hooks: HiRED two CLS rows (first and feature layer), FastV
        # one last-token row (layer K-1); each compared with as many reference computations of the same rows
        assert r["score_rows"] == {"hired": 2, "fastv": 1}[r["method"]], r
        assert r["score_s"] > 0 and r["ref_s"] > 0 and r["ref_ratio"] == pytest.approx(r["ref_s"] / r["score_s"])
        assert r["ref_kind"] == {"hired": "N x N from q/k", "fastv": "eager layer re-run"}[r["method"]]
        assert 0 < r["glue_pct"] < 100  # vlmdrop's own code: a measured share of the prefill
        assert r["ref_official_qk_pct_of_vision"] > 0 and r["ref_eager_layer_pct_of_vision"] > 0
        # not measured: CPU without --memory has no peak memory
        assert r["peak_mem_mb"] is None and r["peak_mem_mb_full"] is None
    # every configuration is compared with the same full-model median
    assert len({r["prefill_s_full"] for r in recs}) == 1


def test_bench_markdown_dashes_for_unmeasured(capsys):
    assert main(["bench", "--quick", "--shapes", "tiny", "--methods", "visionzip", "--budgets", "0.25",
                 "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| shape | method | budget |") and len(lines) == 5
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["tiny", "visionzip", "0.25", "4 / 16"]
    float(cells[10]), float(cells[11]), float(cells[12])  # glue %, score % of vision, score ms: measured
    assert cells[13].endswith("x") and float(cells[13][:-1]) > 0  # reference / score
    assert cells[14:16] == ["-", "-"]  # peak MB full, peak MB: not measured without --memory on CPU
    assert lines[4].startswith("tiny: 16 visual tokens") and "HiRED official" in lines[4]


def test_bench_cpu_memory_fresh_subprocess(capsys):
    (r,) = _bench(capsys, "--methods", "random", "--budgets", "0.5", "--repeat", "1", "--memory")
    # random scores nothing: no score rows, zero scoring time, no reference ratio
    assert (r["score_rows"], r["score_s"], r["score_pct_of_vision"], r["ref_ratio"]) == (0, 0.0, 0.0, None)
    assert r["peak_mem_mb_full"] > 50 and r["peak_mem_mb"] > 50  # peak RSS of a process that imported torch


def test_bench_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedup.png"
    _bench(capsys, "--methods", "pool", "--budgets", "0.25,0.5", "--repeat", "1", "--png", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, tokens", [("llava15", 576), ("llava_next", 2928), ("internvl", 1792)])
def test_real_shapes_have_real_token_counts(name, tokens):
    model, inputs = build(SHAPES[name], device="cpu", dtype="float32")
    image_token = model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == tokens


@pytest.mark.parametrize("argv, msg", [(["--shapes", "llava2"], "--shapes"), (["--methods", "fastvv"], "--methods"),
                                       (["--budgets", "0"], "--budgets"), (["--repeat", "0"], "--repeat")])
def test_bench_usage_errors(capsys, argv, msg):
    assert main(["bench", "--shapes", "tiny", *argv]) == 2
    assert f"vlmdrop bench: error: {msg}" in capsys.readouterr().err


def test_bench_kernels_cpu_times_the_fallbacks(capsys, monkeypatch):
    import vlmdrop.bench as bench

    monkeypatch.setenv("VLMDROP_KERNELS", "auto")
    recs = bench.kernel_bench(device="cpu", repeat=1)
    assert [r["kernel"].split()[0] for r in recs] == ["compact_rows", "segmented_topk", "attention_received"]
    for r in recs:  # no CUDA: the fallback timed, the Triton path not run (never a made-up number)
        assert r["torch_ms"] > 0 and r["triton_ms"] is None and r["equal"] is None
    import os

    assert os.environ["VLMDROP_KERNELS"] == "auto"  # restored


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_bench_a_saved_checkpoint(capsys, tmp_path, family):
    """`--model FOLDER --image WxH`: the checkpoint through the one loader; CLS-free towers (SigLIP, the Qwen ViT)
    score by attention received and are compared with the N x N column mean."""
    from vlmdrop.testing import tiny_llava_onevision, tiny_qwen2_5_vl

    model, processor = {"llava_onevision": lambda: tiny_llava_onevision(text_layers=3),
                        "qwen2_5_vl": lambda: tiny_qwen2_5_vl(text_layers=3)}[family]()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    recs = _bench(capsys, "--model", str(tmp_path), "--image", "90x60", "--methods", "hired,fastv", "--budgets",
                  "0.5", "--repeat", "1")
    assert [r["method"] for r in recs] == ["hired", "fastv"]
    for r in recs:
        assert r["shape"] == f"ckpt={tmp_path}@90x60" and r["n_kept"] == round(0.5 * r["n_before"]) > 0
        assert r["score_rows"] >= 1 and r["ref_s"] > 0


def test_bench_model_usage_error(capsys):
    assert main(["bench", "--model", "x", "--image", "0x5"]) == 2
    assert "vlmdrop bench: error: --image" in capsys.readouterr().err
