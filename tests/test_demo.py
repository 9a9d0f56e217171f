"""vlmdrop.demo without a browser: checked uploads, samples, the streamed comparison, `vlmdrop demo`'s arguments."""

import io
import os
import threading

import pytest
import torch
from PIL import Image

import vlmdrop
from vlmdrop.cli import main
from vlmdrop.demo.backend import DemoBackend, method_choices
from vlmdrop.demo.samples import ImageError, load_samples, read_upload
from vlmdrop.testing import tiny_llava_next


# ---------------------------------------------------------------------------------- uploads
def _png(size=(20, 10), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_read_upload_ok(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    im = read_upload(tmp_path / "a.png", upload_root=tmp_path)
    assert im.size == (20, 10) and im.mode == "RGB" and im.getpixel((3, 3)) == (10, 200, 30)


@pytest.mark.parametrize("data, match", [
    (b"just some text\n", "is not an image"),
    (_png((64, 64))[:-40], "cannot be decoded"),  # truncated: the last chunks cut off
    (b"", "is not an image"),
])
def test_read_upload_refuses_bad_files(tmp_path, data, match):
    (tmp_path / "up.bin").write_bytes(data)
    with pytest.raises(ImageError, match=match):
        read_upload(tmp_path / "up.bin", upload_root=tmp_path)


def test_read_upload_pixel_limit_before_decoding(tmp_path):
    (tmp_path / "big.png").write_bytes(_png((4097, 4096), (0, 0, 0)))  # 16.8 M pixels, a few kB of PNG
    with pytest.raises(ImageError, match=r"4097x4096 = 16,781,312 pixels, over the demo's limit of 16,777,216"):
        read_upload(tmp_path / "big.png", upload_root=tmp_path)
    (tmp_path / "ok.png").write_bytes(_png((50, 50)))
    with pytest.raises(ImageError, match="2,500 pixels, over the demo's limit of 2,499"):
        read_upload(tmp_path / "ok.png", upload_root=tmp_path, max_pixels=2499)


def test_read_upload_only_inside_the_upload_folder(tmp_path):
    root = tmp_path / "uploads"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png())
    with pytest.raises(ImageError, match="not an uploaded file"):
        read_upload(outside, upload_root=root)
    with pytest.raises(ImageError, match="not an uploaded file"):
        read_upload(root / ".." / "secret.png", upload_root=root)
    os.symlink(outside, root / "link.png")  # a link inside pointing outside
    with pytest.raises(ImageError, match="not an uploaded file"):
        read_upload(root / "link.png", upload_root=root)


def test_samples_canvases_and_photos():
    pytest.importorskip("easy_vqa")
    pytest.importorskip("skimage")
    samples = load_samples(n_canvases=2)
    assert [s.label.split(":")[0] for s in samples[:2]] == ["easyvqa-hr test #0", "easyvqa-hr test #1"]
    assert all(s.answer for s in samples[:2]) and samples[0].question.endswith("single word or phrase.")
    photos = [s for s in samples if s.label.startswith("photo")]
    assert len(photos) == 4 and all(s.image.mode == "RGB" and min(s.image.size) >= 300 for s in photos)


# ---------------------------------------------------------------------------------- the comparison
@pytest.fixture(scope="module")
def backend():
    model, processor = tiny_llava_next(image_size=42, patch_size=14, text_layers=4)  # not conftest's 56/14
    return DemoBackend(model, processor, max_new_tokens=5)


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(70, 130, 3, generator=g) * 255).to(torch.uint8).numpy())


def _reference(backend, image, question, method=None, **kw):
    inputs = backend._inputs(image, question)
    handle = vlmdrop.apply(backend.model, method, **kw) if method else None
    try:
        with torch.inference_mode():
            out = backend.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
    return backend.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def test_compare_streams_both_answers_with_stats(backend):
    image, q = _image(), "what is the shape ?"
    steps = list((f.text, f.done, r.text, r.done) for f, r in backend.compare(image, q, "hired", 0.25))
    full, red = None, None
    for full, red in backend.compare(image, q, "hired", 0.25):
        pass
    assert steps[0][1] is False and not steps[0][2]  # the full answer streams first, the reduced one after
    assert sum(1 for s in steps if not s[1]) >= 2  # more than one partial full answer
    assert full.done and red.done and full.new_tokens == red.new_tokens == 5
    assert full.text == _reference(backend, image, q).strip()
    assert red.text == _reference(backend, image, q, "hired", budget=0.25).strip()
    assert full.ttft > 0 and red.ttft > 0 and full.decode_tps > 0 and red.decode_tps > 0
    st = red.stats
    assert full.visual_tokens == st.n_before and red.visual_tokens == st.n_kept == round(0.25 * st.n_before)
    assert "HiredConfig(budget=0.25" in red.config
    assert not backend.model._forward_pre_hooks  # removed: the model is as before


def test_compare_stack_reports_layer_tokens(backend):
    for full, red in backend.compare(_image(1), "what color ?", "hired+fastv", 0.5):
        pass
    st = red.stats
    assert st.method == "hired+fastv" and len(st.layer_tokens) == 4
    assert st.layer_tokens[0] == round(0.5 * st.n_before) and st.n_kept == round(0.5 * st.layer_tokens[0])


def test_compare_two_threads_queue_on_the_lock(backend):
    """Two users at once: each gets the answers it gets alone (apply/remove never interleave)."""
    images = [_image(2), _image(3)]
    alone = []
    for im in images:
        for f, r in backend.compare(im, "what shape ?", "random", 0.3):
            pass
        alone.append((f.text, r.text, r.stats.kept_indices.tolist()))
    got = [None, None]

    def user(k):
        for f, r in backend.compare(images[k], "what shape ?", "random", 0.3):
            pass
        got[k] = (f.text, r.text, r.stats.kept_indices.tolist())

    threads = [threading.Thread(target=user, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


@pytest.mark.parametrize("method, budget, match", [("nope", 0.2, "'nope' is not one of"),
                                                   ("fastv+hired", 0.2, "'fastv\\+hired'"),
                                                   ("hired", 0.0, "budget 0.0"), ("hired", 1.5, "budget 1.5")])
def test_bad_method_or_budget_is_named(backend, method, budget, match):
    with pytest.raises(ValueError, match=match):
        next(backend.compare(_image(), "q", method, budget))


def test_method_choices_every_method_and_stacks():
    choices = method_choices()
    assert set(vlmdrop.methods()) <= set(choices) and "hired+fastv" in choices and "visionzip+pdrop" in choices
    assert "fastv+pdrop" not in choices and "fastv+hired" not in choices


# ---------------------------------------------------------------------------------- vlmdrop demo
def test_cli_demo_defaults_to_localhost(monkeypatch):
    seen = {}
    monkeypatch.setattr("vlmdrop.demo.launch", lambda **kw: seen.update(kw))
    assert main(["demo"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["share"] is False and seen["model"] is None
    assert main(["demo", "--host", "0.0.0.0", "--port", "7999", "--share", "--dtype", "bfloat16",
                 "--device", "cpu", "--max-new-tokens", "8"]) == 0
    assert (seen["host"], seen["port"], seen["share"], seen["dtype"], seen["device"], seen["max_new_tokens"]) == \
        ("0.0.0.0", 7999, True, "bfloat16", "cpu", 8)


@pytest.mark.parametrize("argv, match", [(["--port", "70000"], "--port 70000"),
                                         (["--max-new-tokens", "0"], "--max-new-tokens 0"),
                                         (["--model", "/no/such/folder"], "/no/such/folder")])
def test_cli_demo_user_errors(argv, match, capsys):
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmdrop demo: error:") and match in err


def test_warm_up_leaves_the_model_as_before(backend):
    image = _image(4)
    before = _reference(backend, image, "what shape ?")
    backend.warm_up()
    assert not backend.model._forward_pre_hooks and _reference(backend, image, "what shape ?") == before


def test_cli_demo_without_gradio(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["demo"]) == 2
    assert "needs gradio, which is not installed: pip install 'vlmdrop[demo]'" in capsys.readouterr().err


def test_checkpoint_folder_internvl_end_to_end(tmp_path):
    """`--model FOLDER --dtype float32 --device cpu`: a saved InternVL (48 px tiles: 9 tokens per tile) through the
    loader, a stack, and the pictures (tiles and thumbnail panels, per-crop and per-layer charts)."""
    from vlmdrop.demo.app import _pictures
    from vlmdrop.testing import tiny_internvl

    model, processor = tiny_internvl(tile_size=48, patch_size=8, max_patches=4, text_layers=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    backend = DemoBackend.load(str(tmp_path), dtype="float32", device="cpu", max_new_tokens=3)
    assert backend.model.dtype == torch.float32 and backend.model.device.type == "cpu"
    image = _image(5).resize((300, 120))
    for full, red in backend.compare(image, "what is it ?", "pool+pdrop", 0.3):
        pass
    st = red.stats
    assert st.n_before == full.visual_tokens == 36 and len(st.crop_budgets) == 4  # 1x3 tiles + thumbnail
    assert st.layer_tokens[0] == round(0.3 * 36) and st.n_kept == st.layer_tokens[-1]
    picture, budgets, layers, note = _pictures(image, backend, red)
    assert picture.size == (2 * 300 + 8, 120 + 18) and budgets is not None and layers is not None, note


def test_an_abandoned_comparison_does_not_block_the_next(backend):
    """A browser that goes away mid-answer leaves its generator suspended (never resumed, never closed): the next
    user's comparison still runs (the work and the lock live on a worker thread, not in the suspended generator)."""
    abandoned = backend.compare(_image(6), "what shape ?", "hired", 0.3)
    next(abandoned)
    result = []
    t = threading.Thread(target=lambda: result.extend(backend.compare(_image(7), "what shape ?", "pool", 0.3)),
                         daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the second comparison waited for the abandoned one"
    assert result and result[-1][1].done and result[-1][1].stats.n_kept > 0
    del abandoned


def test_page_updates_turn_errors_into_one_line(backend, monkeypatch):
    from vlmdrop.demo.app import comparison_updates

    def no_image():
        raise ImageError("pick a sample or upload an image first")

    out = list(comparison_updates(backend, no_image, "q", "hired", 0.2, 3))
    assert len(out) == 1 and out[0][-1] == "**Error:** pick a sample or upload an image first"
    out = list(comparison_updates(backend, _image, "  ", "hired", 0.2, 3))
    assert out[-1][-1] == "**Error:** type a question"
    out = list(comparison_updates(backend, _image, "q", "pdrop", 0.2, 3))  # fine: layers from the 4-layer LM
    assert out[-1][-1] == "" and out[-1][4] is not None and out[-1][6] is not None and out[-1][5] is None

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(backend.model, "generate", boom)
    out = list(comparison_updates(backend, _image, "q", "hired", 0.2, 3))
    assert out[-1][-1] == "**Error:** the model failed: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert out[-1][:4] == ("", "", "", "")


def test_checkpoint_folder_onevision_end_to_end(tmp_path):
    """A saved LLaVA-OneVision (SigLIP without CLS: HiRED scores by attention received; a grid the model
    down-samples) through the loader, HiRED + FastV, and the pictures."""
    from vlmdrop.demo.app import _pictures
    from vlmdrop.testing import tiny_llava_onevision

    model, processor = tiny_llava_onevision(image_size=42, patch_size=14, text_layers=3,
                                            vision_aspect_ratio="anyres_max_1")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    backend = DemoBackend.load(str(tmp_path), dtype="float32", device="cpu", max_new_tokens=3)
    image = _image(5).resize((200, 200))  # 3x3 grid of 3x3 patches, down-sampled to 3x3 rows + 3 newlines
    for full, red in backend.compare(image, "what is it ?", "hired+fastv", 0.3):
        pass
    st = red.stats
    assert st.n_before == full.visual_tokens == 9 + 12 and len(st.crop_budgets) == 10
    assert st.layer_tokens[0] == round(0.3 * 21)
    picture, budgets, layers, note = _pictures(image, backend, red)
    assert picture is not None and budgets is not None and layers is not None, note


def test_checkpoint_folder_qwen2_5_vl_end_to_end(tmp_path):
    """A saved Qwen2.5-VL (one crop, M-RoPE, windowed ViT without CLS) through the loader, HiRED + FastV, and
    the pictures."""
    from vlmdrop.demo.app import _pictures
    from vlmdrop.testing import tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(patch_size=14, window_size=56, text_layers=3, max_tokens=40)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    backend = DemoBackend.load(str(tmp_path), dtype="float32", device="cpu", max_new_tokens=3)
    image = _image(5).resize((150, 90))
    for full, red in backend.compare(image, "what is it ?", "hired+fastv", 0.3):
        pass
    st = red.stats
    assert st.n_before == full.visual_tokens and len(st.crop_budgets) == 1
    assert st.layer_tokens[0] == round(0.3 * st.n_before)
    picture, budgets, layers, note = _pictures(image, backend, red)
    assert picture is not None and layers is not None, note
