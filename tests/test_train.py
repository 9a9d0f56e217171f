"""vlmdrop.zoo.train: a few steps end to end, the saved folder loads through from_pretrained /
AutoProcessor, the early chance check stops a run, and the AnyRes tile mapping is right."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("easy_vqa")

from vlmdrop.zoo.mini import MiniConfig, build_mini_processor  # noqa: E402
from vlmdrop.zoo.train import (  # noqa: E402
    ChanceError,
    TrainArgs,
    patch_labels,
    shape_tile_index,
    tile_box,
    train,
    view_around,
    zoom_view,
)

SMALL = MiniConfig(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)


def _args(out, **kw):
    base = dict(out=str(out), seed=0, minutes=5, steps_a=2, steps_b=3, batch=2, eval_n=3, check_at=0,
                save_every=2, progress=False, model=SMALL)
    base.update(kw)
    return TrainArgs(**base)


def test_tiny_run_end_to_end_and_loads(tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

    out = tmp_path / "run"
    result = train(_args(out))
    assert result["finished"] and set(result) >= {"shape", "color", "yes_no", "all"}
    assert (out / "model.safetensors").is_file() and (out / "train_state.pt").is_file()
    model = LlavaNextForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaNextProcessor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (336, 672), "white"), text=prompt, return_tensors="pt")
    assert "<unk>" not in processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 2
    # the evaluation module runs on the saved model, with and without dropping
    from vlmdrop.zoo.easyvqa_hr import easyvqa_hr_records
    from vlmdrop.zoo.evaluate import evaluate_dropping

    recs = list(easyvqa_hr_records("test", seed=0, n=4))
    full = evaluate_dropping(model, processor, recs, None, 1.0, batch=4)
    hired = evaluate_dropping(model, processor, recs, "hired", 0.1, batch=4)
    assert full["touch"] == 1.0 and 0.0 <= hired["touch_grid"] <= hired["touch"] <= 1.0
    assert hired["kept_mean"] < 30
    # a second call on the finished folder resumes from the saved state: same weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train(_args(out))["finished"]
    again = LlavaNextForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_early_check_stops_a_run_at_chance(tmp_path):
    with pytest.raises(ChanceError, match=r"shape accuracy .* chance 0\.333"):
        train(_args(tmp_path / "chance", steps_a=0, steps_b=2, check_at=0.5, check_shape=1.01))
    assert (tmp_path / "chance" / "train_state.pt").is_file()


@pytest.mark.parametrize("size", [(336, 672), (672, 336), (672, 672), (1008, 336), (500, 700), (700, 500)])
def test_shape_tile_index_finds_the_tile_with_the_shape(size):
    processor = build_mini_processor()
    ip = processor.image_processor
    w, h = size
    rng = np.random.default_rng(w * 7 + h)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        img = Image.new("RGB", size, "white")
        img.paste(Image.new("RGB", (40, 40), (255, 0, 0)), (x0, y0))
        pv = ip(images=[img], return_tensors="pt")["pixel_values"][0]  # (P, 3, s, s)
        red = ((pv[:, 0] > 1.0) & (pv[:, 1] < -1.0)).flatten(1).sum(1)  # (P,) red pixels per view
        crop = ip.crop_size["height"]
        bbox = (x0, y0, x0 + 40, y0 + 40)
        tile = shape_tile_index(size, bbox, ip.image_grid_pinpoints, crop)
        assert tile >= 1 and red[tile] == red[1:].max() > 0, (size, (x0, y0), tile, red.tolist())
        # tile_box: the red pixels of that tile lie in the mapped box (1 px of resampling slack)
        ys, xs = torch.nonzero((pv[tile, 0] > 1.0) & (pv[tile, 1] < -1.0), as_tuple=True)
        bx0, by0, bx1, by1 = tile_box(size, bbox, ip.image_grid_pinpoints, crop, tile)
        assert xs.min() >= bx0 - 1 and xs.max() < bx1 + 1 and ys.min() >= by0 - 1 and ys.max() < by1 + 1
        # patch_labels marks exactly the patches holding most of the red
        patch = processor.patch_size
        g = crop // patch
        per_patch = ((pv[tile, 0] > 1.0) & (pv[tile, 1] < -1.0)).reshape(g, patch, g, patch).sum((1, 3)).reshape(-1)
        labels = patch_labels((bx0, by0, bx1, by1), 5, crop, patch)
        assert set(labels.unique().tolist()) <= {0, 5}
        assert bool((per_patch[labels == 5] > 0).all())
        assert bool((per_patch[labels == 0] < 0.25 * patch * patch + patch).all())
    view = zoom_view(img, (x0, y0, x0 + 40, y0 + 40), rng, 168)
    assert view.size == (168, 168)


def test_view_around_maps_the_box_into_the_view():
    rng = np.random.default_rng(0)
    img = Image.new("RGB", (672, 336), "white")
    bbox = (400, 100, 430, 140)
    img.paste(Image.new("RGB", (30, 40), (255, 0, 0)), bbox[:2])
    for side in (60, 150, 224, 1000):  # 1000: clipped to the canvas' short side
        view, box = view_around(img, bbox, rng, 112, side)
        assert view.size == (112, 112)
        arr = np.asarray(view, dtype=np.int32)
        ys, xs = np.nonzero((arr[..., 0] > 200) & (arr[..., 1] < 60))
        assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1
        assert 0 <= box[0] < box[2] <= 112 and 0 <= box[1] < box[3] <= 112


def test_patch_labels_overlap_rule():
    # box covering a quarter of patch (0, 1) and most of patch (1, 0): 16 px patches of a 112 px view
    labels = patch_labels((10, 10, 40, 30), 2, 112, 16).reshape(7, 7)
    assert labels[0, 1] == 2 and labels[1, 0] == 2 and labels[1, 1] == 2 and labels[1, 2] == 2
    assert labels[0, 0] == 0 and labels.sum() == 2 * 4
    # a box smaller than a quarter patch still labels the patch holding half of it
    assert patch_labels((50, 50, 54, 54), 1, 112, 16).sum() == 1


def test_stage_a_check_reports_tower_accuracy(tmp_path):
    with pytest.raises(ChanceError, match=r"end of stage A .* colour accuracy .* chance 0\.125"):
        train(_args(tmp_path / "a", steps_a=1, steps_b=2, check_at=0.5, check_color=1.01, check_shape=0.0))


def test_cli_runs_and_writes_the_model(tmp_path, capsys):
    import json

    from vlmdrop.zoo.train import main

    out = tmp_path / "cli"
    rc = main(["--out", str(out), "--steps-a", "1", "--steps-b", "1", "--batch", "1", "--eval-n", "2",
               "--check-at", "0", "--no-progress", "--crop", "56", "--patch", "14", "--vision-layers", "2",
               "--text-layers", "1", "--feature-layer", "1", "--cls-shape", "zoom", "--drop-visual", "0.4"])
    assert rc == 0 and (out / "model.safetensors").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finished"] is True
    assert json.loads((out / "train_args.json").read_text())["drop_visual"] == 0.4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_feature_layer"] == 1 and cfg["vision_config"]["patch_size"] == 14


def test_args_are_validated():
    with pytest.raises(ValueError, match="cls_shape"):
        TrainArgs(out="x", cls_shape="tiles")
    with pytest.raises(ValueError, match="batch"):
        TrainArgs(out="x", batch=0)


class _Clock:
    """Stands in for ``time`` in vlmdrop.zoo.train: the ``--minutes`` cap is reached after ``steps`` training steps
    (one ``monotonic()`` call at the start, then one per step), so a run stops at a chosen step on any machine."""

    def __init__(self, steps):
        self.calls, self.steps = 0, steps

    def monotonic(self):
        self.calls += 1
        return 0.0 if self.calls <= self.steps + 1 else 1e9


def _weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def _same_weights(wa, wb):
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_runs_and_a_resumed_run_give_the_same_weights(tmp_path, monkeypatch):
    import shutil

    import vlmdrop.zoo.train as train_mod

    # 3 + 3 steps, saves every 2, the chance checks on (thresholds 0: they pass) so a check row sits in stage B
    kw = dict(steps_a=3, steps_b=3, check_at=0.5, check_shape=0.0, check_color=0.0)
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert train(_args(a, **kw))["finished"] and train(_args(b, **kw))["finished"]
    assert _same_weights(_weights(a), _weights(b))
    # the same command interrupted by the time cap mid stage A, at the A -> B switch and mid stage B (after the
    # check), each time resumed by rerunning it
    for steps, where in ((1, ("A", 1)), (2, ("B", 0)), (2, ("B", 2))):
        monkeypatch.setattr(train_mod, "time", _Clock(steps))
        result = train(_args(c, **kw))
        assert (result["finished"], result["stage"], result["step"]) == (False, *where)
        if where == ("A", 1):
            shutil.copytree(c, d)
    monkeypatch.undo()
    assert train(_args(c, **kw))["finished"]
    assert _same_weights(_weights(a), _weights(c))
    # the loss EMA is part of the state: the resumed run's log is the uninterrupted run's, line for line
    assert (c / "train_log.jsonl").read_text() == (a / "train_log.jsonl").read_text()
    # the state holds only what torch.load(weights_only=True) reads
    st = torch.load(c / "train_state.pt", weights_only=True)
    assert st["format"] == 2 and (st["stage"], st["step"]) == ("B", 3)
    # a state in the previous layout (no format key, log as a list, no EMA) that weights_only=True accepts resumes
    old = torch.load(d / "train_state.pt", weights_only=True)
    old["log"] = json.loads(old.pop("log_json"))
    del old["format"], old["ema"]
    torch.save(old, d / "train_state.pt")
    assert train(_args(d, **kw))["finished"]
    assert _same_weights(_weights(a), _weights(d))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("case", ["code", "numpy", "truncated", "format"])
def test_a_state_that_weights_only_refuses_is_not_resumed(tmp_path, case, capsys):
    from vlmdrop.zoo.train import StateError, main

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "unpickled"
    state = out / "train_state.pt"
    if case == "code":  # a pickle that runs code when loaded with weights_only=False
        torch.save({"model": {}, "stage": "A", "step": 0, "log": [_Payload(marker)]}, state)
        match = r"refused by torch\.load\(weights_only=True\): it pickles \S+"
    elif case == "numpy":  # a previous-format state whose log held a numpy number
        torch.save({"model": {}, "heads": {}, "opt_a": {}, "opt_b": {}, "stage": "A", "step": 1,
                    "log": [{"loss": np.float64(1.0)}]}, state)
        match = r"it pickles numpy\S*scalar"
    elif case == "truncated":
        torch.save({"format": 2, "step": 1}, state)
        state.write_bytes(state.read_bytes()[:40])
        match = r"cannot be read as a training state"
    else:
        torch.save({"format": 9, "stage": "A", "step": 0}, state)
        match = r"state format 9"
    with pytest.raises(StateError, match=match) as err:
        train(_args(out))
    assert str(state) in str(err.value) and "start from scratch" in str(err.value)
    assert not marker.exists() and not (out / "model.safetensors").exists()
    # the CLI says the same and exits with 2
    argv = ["--out", str(out), "--steps-a", "1", "--steps-b", "1", "--batch", "1", "--check-at", "0", "--no-progress"]
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err and not marker.exists()
    if case == "code":  # the payload is real: the previous loader (weights_only=False) would have run it
        torch.load(state, weights_only=False)
        assert marker.exists()


def test_yes_no_share_sets_the_stage_b_mix_from_the_stream_in_order():
    from vlmdrop.zoo.easyvqa_hr import easyvqa_hr_qtype_index, easyvqa_hr_records
    from vlmdrop.zoo.train import _stage_b_records

    stream = list(easyvqa_hr_records("train", seed=0, n=24))
    yes_no = [r for r in stream if r["qtype"] == "yes_no"]
    other = [r for r in stream if r["qtype"] != "yes_no"]
    assert [easyvqa_hr_qtype_index("train", 0, k, qtypes=("yes_no",)) for k in range(8)] == \
        [i for i, r in enumerate(stream) if r["qtype"] == "yes_no"]
    # default: the stream itself, a third of each type
    default = _args("x", batch=4)
    got = [r["id"] for t in range(3) for r in _stage_b_records(default, t)]
    assert got == [r["id"] for r in stream[:12]]
    # share 1/2: every other sample is the next yes/no record, the rest the next shape-or-colour record
    half = _args("x", batch=4, yes_no_share=0.5)
    got = [r for t in range(3) for r in _stage_b_records(half, t)]
    assert [r["qtype"] == "yes_no" for r in got] == [False, True] * 6
    assert [r["id"] for r in got[1::2]] == [r["id"] for r in yes_no[:6]]
    assert [r["id"] for r in got[0::2]] == [r["id"] for r in other[:6]]
    # share 3/4 over 8 samples: exactly 6 yes/no
    assert sum(r["qtype"] == "yes_no" for r in _stage_b_records(_args("x", batch=8, yes_no_share=0.75), 0)) == 6
    with pytest.raises(ValueError, match="qtypes"):
        easyvqa_hr_qtype_index("train", 0, 0, qtypes=("colour",))


def test_init_from_starts_a_fresh_run_from_saved_weights(tmp_path):
    src = tmp_path / "src"
    assert train(_args(src, steps_a=2, steps_b=2))["finished"]
    # no steps: the run only saves the model, which must be the source's, not the seed's fresh init
    copy = tmp_path / "copy"
    assert train(_args(copy, steps_a=0, steps_b=0, init_from=str(src)))["finished"]
    assert _same_weights(_weights(src), _weights(copy))
    fresh = tmp_path / "fresh"
    assert train(_args(fresh, steps_a=0, steps_b=0))["finished"]
    assert not _same_weights(_weights(src), _weights(fresh))
    # training on top moves away from the source; the same command gives the same weights
    on, again = tmp_path / "on", tmp_path / "again"
    for out in (on, again):
        assert train(_args(out, steps_a=0, steps_b=2, init_from=str(src), yes_no_share=0.5))["finished"]
    assert _same_weights(_weights(on), _weights(again)) and not _same_weights(_weights(src), _weights(on))
    # a folder of another architecture is refused, naming it
    with pytest.raises(ValueError, match=r"init_from=.*src.* does not match"):
        train(_args(tmp_path / "bad", steps_a=0, steps_b=0, init_from=str(src),
                    model=MiniConfig(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                                     text_layers=2, text_heads=2)))


def test_new_stage_b_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match=r"yes_no_share .* got 1\.5"):
        TrainArgs(out="x", yes_no_share=1.5)
    with pytest.raises(ValueError, match=r"init_from=.*nowhere.* no config\.json"):
        TrainArgs(out="x", init_from=str(tmp_path / "nowhere"))


def test_yes_no_plain_first_feeds_only_plain_yes_no_questions_at_first():
    import re

    from vlmdrop.zoo.easyvqa_hr import easyvqa_hr_qtype_index, easyvqa_hr_records
    from vlmdrop.zoo.train import _stage_b_records

    def negated(r):
        return bool({"not", "no"} & set(re.findall(r"[a-z]+", r["question"].lower())))

    stream = list(easyvqa_hr_records("train", seed=0, n=36))
    plain = [r for r in stream if r["qtype"] == "yes_no" and not negated(r)]
    assert len(plain) == 6 and sum(r["qtype"] == "yes_no" and negated(r) for r in stream) == 6
    assert [easyvqa_hr_qtype_index("train", 0, k, qtypes=("yes_no",), negated=False) for k in range(6)] == \
        [stream.index(r) for r in plain]
    args = _args("x", batch=4, steps_b=4, yes_no_share=0.5, yes_no_plain_first=0.5)
    first = [r for t in (0, 1) for r in _stage_b_records(args, t) if r["qtype"] == "yes_no"]
    assert [r["id"] for r in first] == [r["id"] for r in plain[:4]]  # steps 0-1: the plain ones, in order
    later = [r for r in _stage_b_records(args, 2) if r["qtype"] == "yes_no"]  # step 2: every yes/no, in order
    assert [r["id"] for r in later] == [r["id"] for r in stream if r["qtype"] == "yes_no"][4:6]
    # without the option the first steps hold negated questions too
    mixed = [r for t in range(3) for r in _stage_b_records(_args("x", batch=4, yes_no_share=0.5), t)]
    assert any(negated(r) for r in mixed if r["qtype"] == "yes_no")
    with pytest.raises(ValueError, match=r"negated=False filters yes/no questions"):
        easyvqa_hr_qtype_index("train", 0, 0, qtypes=("shape",), negated=False)
    with pytest.raises(ValueError, match=r"yes_no_plain_first=0\.5 needs yes_no_share"):
        TrainArgs(out="x", yes_no_plain_first=0.5)
    with pytest.raises(ValueError, match=r"yes_no_plain_first must lie in \[0, 1\], got 2"):
        TrainArgs(out="x", yes_no_share=0.5, yes_no_plain_first=2)


def _eager_self_attention(model, views, upto):
    """Reference: the eager attention maps of the tower's first ``upto`` layers, the patch rows' weight on the
    patch itself."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        att = tower(views, output_attentions=True).attentions[:upto]  # each (V, H, 1 + N, 1 + N)
    finally:
        tower.config._attn_implementation = "sdpa"
    return [torch.diagonal(a[:, :, 1:, 1:], dim1=-2, dim2=-1) for a in att]  # each (V, H, N)


@pytest.mark.parametrize("feature_layer, upto", [(-2, 2), (-1, 3), (1, 1)])
def test_patch_locality_loss_is_the_cross_entropy_of_each_patch_row_with_itself(feature_layer, upto):
    from vlmdrop.zoo.mini import build_mini
    from vlmdrop.zoo.train import _PatchLocality

    cfg = MiniConfig(vision_hidden=32, vision_layers=3, vision_heads=4, text_hidden=32, text_layers=1, text_heads=2,
                     feature_layer=feature_layer)
    model, _ = build_mini(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(3, 3, cfg.crop, cfg.crop, generator=g)
    probe = _PatchLocality(model, 2.5)
    assert len(probe.attn) == upto  # the layers up to the one whose output the LLM receives
    with probe:
        model.model.vision_tower(views)
    loss = probe.loss()
    own = _eager_self_attention(model, views, upto)
    ref = 2.5 * torch.stack([-(d.log()).mean() for d in own]).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    mean_own = float(torch.stack([d.mean() for d in own]).mean().detach())
    assert probe.logged()["self_attention"] == pytest.approx(mean_own, rel=1e-4)
    # gradients reach the tower's q/k projections; the hooks are gone after the block
    loss.backward()
    assert model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(not a._forward_pre_hooks for a in probe.attn)
    with probe:  # nothing recorded outside the block, a fresh record inside
        pass
    assert float(probe.loss()) == 0.0


def test_patch_locality_off_records_nothing_and_on_makes_patches_attend_to_themselves(tmp_path):
    from vlmdrop.zoo.mini import build_mini
    from vlmdrop.zoo.train import _PatchLocality

    model, _ = build_mini(SMALL, seed=0)
    off = _PatchLocality(model, 0.0)
    with off:
        model.model.vision_tower(torch.zeros(1, 3, SMALL.crop, SMALL.crop))
    assert float(off.loss()) == 0.0 and off.logged() == {}
    # a short stage A with the loss on raises the patches' attention on themselves (logged), same command same run
    out = tmp_path / "local"
    assert train(_args(out, steps_a=30, steps_b=2, save_every=15, local_patches=5.0, lr_a=1e-2))["finished"]
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    a = [r["self_attention"] for r in rows if r["stage"] == "A"]
    assert len(a) == 2 and a[1] > a[0] > 1 / (1 + 49), a  # 1 / (CLS + 49 patches): uniform attention
    assert all("self_attention" in r for r in rows if r["stage"] == "B" and "loss" in r)
    with pytest.raises(ValueError, match="local_patches must be >= 0"):
        TrainArgs(out="x", local_patches=-1.0)


def test_drop_visual_hides_only_image_tokens_from_the_lm_and_is_reproducible():
    from vlmdrop.zoo.mini import build_mini
    from vlmdrop.zoo.train import _stage_b_batch

    model, processor = build_mini(SMALL, seed=0)
    plain = _stage_b_batch(_args("x", batch=4, steps_b=10), processor, 5)
    dropped = _stage_b_batch(_args("x", batch=4, steps_b=10, drop_visual=0.9), processor, 5)
    again = _stage_b_batch(_args("x", batch=4, steps_b=10, drop_visual=0.9), processor, 5)
    for k in plain:  # everything but the mask is the batch without dropout
        assert torch.equal(plain[k], dropped[k]) or k == "attention_mask", k
        assert torch.equal(dropped[k], again[k]), k
    image = plain["input_ids"] == processor.image_token_id
    changed = plain["attention_mask"] != dropped["attention_mask"]
    assert changed.any() and not (changed & ~image).any()  # some visual tokens hidden, no text or padding
    assert (dropped["attention_mask"][changed] == 0).all()
    rates = (changed.sum(1) / image.sum(1)).tolist()  # per row: a rate drawn from U(0, 0.9)
    assert max(rates) < 0.95 and len(set(rates)) == 4, rates
    # the LM really loses those tokens: the answer logits move; with the mask back they match again
    with torch.no_grad():
        a = model(**plain).logits[:, -3]
        b = model(**dropped).logits[:, -3]
        c = model(**{**dropped, "attention_mask": plain["attention_mask"]}).logits[:, -3]
    assert not torch.allclose(a, b) and torch.allclose(a, c)
    with pytest.raises(ValueError, match=r"drop_visual must lie in \[0, 1\), got 1"):
        TrainArgs(out="x", drop_visual=1)


def test_drop_positions_compact_equals_removing_the_hidden_tokens():
    """Reference: the LM run on each row with its hidden visual tokens (and padding) cut out of the sequence.
    ``drop_positions="compact"`` must give the same answer logits; ``"keep"`` does not (its positions have gaps)."""
    from vlmdrop.zoo.mini import build_mini
    from vlmdrop.zoo.train import _stage_b_batch

    model, processor = build_mini(SMALL, seed=0)
    model.eval()
    lm = model.model.language_model
    seen = {}
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    logits = {}
    try:
        for mode in ("keep", "compact"):
            batch = _stage_b_batch(_args("x", batch=4, steps_b=10, drop_visual=0.9, drop_positions=mode), processor, 5)
            assert ("position_ids" in batch) == (mode == "compact")
            with torch.no_grad():
                logits[mode] = model(**batch).logits[:, -3]  # (B, V): the answer's logits
    finally:
        handle.remove()
    mask, embeds = batch["attention_mask"], seen["inputs_embeds"]  # the compact batch's LM input
    hidden = (batch["input_ids"] == processor.image_token_id) & (mask == 0)
    assert hidden.sum(1).min() > 0  # every row hides some visual tokens
    for j in range(mask.shape[0]):
        keep = mask[j] == 1
        with torch.no_grad():
            h = lm(inputs_embeds=embeds[j, keep][None]).last_hidden_state[0, -3]
            ref = model.lm_head(h)
        err_compact = float((logits["compact"][j] - ref).abs().max())
        err_keep = float((logits["keep"][j] - ref).abs().max())  # position gaps: a small random LM still moves
        assert err_compact < 1e-5 and err_keep > 20 * max(err_compact, 1e-7), (j, err_compact, err_keep)
    with pytest.raises(ValueError, match="drop_positions must be 'keep' or 'compact'"):
        TrainArgs(out="x", drop_positions="shift")


def test_probe_targets_spell_the_yes_no_parity_and_the_canvas():
    from vlmdrop.zoo.easyvqa_hr import ANSWER_COLORS, SHAPES, easyvqa_hr_records
    from vlmdrop.zoo.train import probe_targets

    seen = set()
    for r in easyvqa_hr_records("train", seed=0, n=24):
        shape, color, asked, negated, match = probe_targets(r)
        assert (shape, color) == (SHAPES.index(r["shape"]), list(ANSWER_COLORS).index(r["color"]))
        if r["qtype"] != "yes_no":
            assert (asked, negated, match) == (-100, -100, -100)
            continue
        word = (SHAPES + tuple(ANSWER_COLORS))[asked]
        assert word in r["question"].split() or word + "?" in r["question"].split()
        assert bool(match) == (word in (r["shape"], r["color"]))
        assert (r["answer"] == "yes") == (bool(match) != bool(negated))  # the parity the LM must compute
        seen.add((negated, match))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # the four cells are all there in two blocks
    bad = {"qtype": "yes_no", "question": "is there a red circle?", "shape": "circle", "color": "red", "answer": "yes"}
    with pytest.raises(ValueError, match="names .*red.*circle"):
        probe_targets(bad)
    with pytest.raises(ValueError, match="not match XOR negation"):
        probe_targets({**bad, "question": "is there not a circle?"})


def test_answer_probes_add_a_loss_that_trains_and_resume_checks_them(tmp_path, monkeypatch):
    import vlmdrop.zoo.train as train_mod
    from vlmdrop.zoo.mini import build_mini
    from vlmdrop.zoo.train import _make_probes, _stage_b_batch

    cfg = MiniConfig(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=3, text_heads=2)
    args = _args("x", batch=6, steps_b=10, answer_probes=1.0, yes_no_share=0.5, model=cfg)
    model, processor = build_mini(cfg, seed=0)
    batch = _stage_b_batch(args, processor, 0)
    targets = batch.pop("probe_targets")
    assert targets.shape == (6, 5) and (targets[:, :2] >= 0).all() and ((targets[:, 2:] >= 0).sum(0) == 3).all()
    plain = _stage_b_batch(_args("x", batch=6, steps_b=10, yes_no_share=0.5, model=cfg), processor, 0)
    assert plain.keys() == batch.keys() and all(torch.equal(plain[k], batch[k]) for k in batch)
    probes = _make_probes(args)
    assert (probes.early, probes.late) == (2, 2)
    assert [p.out_features for p in probes.heads] == [3, 8, 11, 2, 2]
    assert _make_probes(_args("x")) is None
    # the loss is the mean of the five cross-entropies, each on its rows, at the answer position of its layer
    hs = model(**batch, output_hidden_states=True).hidden_states
    assert len(hs) == 4
    want = []
    for k, head in enumerate(probes.heads):
        rows = targets[:, k] >= 0
        want.append(torch.nn.functional.cross_entropy(head(hs[2][rows, -3]), targets[rows, k]))
    assert torch.allclose(probes.loss(hs, targets), torch.stack(want).mean())
    # gradient reaches the LM through the probes (what they are for)
    model.zero_grad()
    probes.loss(hs, targets).backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.language_model.layers[2].self_attn.q_proj.weight.grad is None  # layer 2's output is read
    # a run with probes is reproducible, differs from one without, and its state refuses a resume without them
    kw = dict(steps_a=0, steps_b=2, yes_no_share=0.5, model=cfg)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (a, b):
        assert train(_args(out, answer_probes=0.5, **kw))["finished"]
    assert train(_args(c, **kw))["finished"]
    assert _same_weights(_weights(a), _weights(b)) and not _same_weights(_weights(a), _weights(c))
    assert "probes" in torch.load(a / "train_state.pt", weights_only=True)
    with pytest.raises(train_mod.StateError, match="with answer probes"):
        train(_args(a, **{**kw, "steps_b": 3}))
    with pytest.raises(ValueError, match="answer_probes must be >= 0"):
        TrainArgs(out="x", answer_probes=-1.0)


def test_saliency_share_is_the_cls_patch_mass_on_the_target_summed_over_heads():
    from vlmdrop.zoo.train import saliency_share

    rows = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5]]])  # (V=1, H=2, CLS + 3 patches)
    target = torch.tensor([[False, True, False]])
    # patch mass summed over heads: [0.25, 0.75, 0.5] of 1.5; the CLS column (0.5 in head 0) left out
    assert torch.allclose(saliency_share(rows, target), torch.tensor([0.75 / 1.5]))
    assert torch.allclose(saliency_share(rows, torch.ones(1, 3, dtype=torch.bool)), torch.tensor([1.0]))


def test_stage_c_trains_only_the_cls_saliency_and_resumes_and_chains_to_the_same_weights(tmp_path, monkeypatch):
    import dataclasses

    import vlmdrop.zoo.train as train_mod

    cfg = dataclasses.replace(SMALL, feature_layer=-1)  # the LLM reads the last layer: two layers trained
    kw = dict(steps_a=2, steps_b=2, save_every=2, lr_c=1e-2, model=cfg)
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert train(_args(a, steps_c=0, **kw))["finished"]
    assert train(_args(b, steps_c=6, **kw))["finished"]
    wa, wb = _weights(a), _weights(b)
    changed = {k for k in wa if not torch.equal(wa[k], wb[k])}
    assert changed == {"vision_tower.embeddings.class_embedding"} | {
        f"vision_tower.encoder.layers.{i}.self_attn.{p}_proj.{w}" for i in (0, cfg.vision_layers - 1)
        for p in "qk" for w in ("weight", "bias")}, sorted(changed)
    rows = [json.loads(x) for x in (b / "train_log.jsonl").read_text().splitlines()]
    c_rows = [r for r in rows if r["stage"] == "C"]
    assert [r["step"] for r in c_rows] == [2, 4, 6]
    # on the canvases it trained on, the CLS rows of both layers put more of their patch mass on the shape
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from vlmdrop.zoo.train import _Saliency, _stage_c_batch, saliency_share

    views = [_stage_c_batch(_args(a, **kw), AutoProcessor.from_pretrained(a), s) for s in range(3)]
    shares = []
    for out in (a, b):
        model = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
        sal = _Saliency(model)
        with torch.no_grad():
            got = [sal.cls_rows(model.model.vision_tower, v["views"], cfg.feature_layer)[0] for v in views]
        shares.append([float(torch.cat([saliency_share(r[i], v["target"]) for r, v in zip(got, views)]).mean())
                       for i in (0, cfg.vision_layers - 1)])
    assert shares[1][0] > shares[0][0] and shares[1][1] > shares[0][1], shares
    assert c_rows[-1]["feature_change"] < 0.05  # the LLM's patch features stay close to stage B's
    # interrupted at the B -> C switch (after 2 + 2 steps) and mid stage C, each time resumed by rerunning: the
    # uninterrupted run's weights and log
    for steps, where in ((4, ("C", 0)), (1, ("C", 1)), (2, ("C", 3))):
        monkeypatch.setattr(train_mod, "time", _Clock(steps))
        result = train(_args(c, steps_c=6, **kw))
        assert (result["finished"], result["stage"], result["step"]) == (False, *where)
    monkeypatch.undo()
    assert train(_args(c, steps_c=6, **kw))["finished"]
    assert _same_weights(wb, _weights(c))
    assert (c / "train_log.jsonl").read_text() == (b / "train_log.jsonl").read_text()
    # stage C alone on the saved stage-B model (--init-from, no stage A or B) is the one-command run
    assert train(_args(d, **{**kw, "steps_a": 0, "steps_b": 0}, steps_c=6, init_from=str(a)))["finished"]
    assert _same_weights(wb, _weights(d))
    with pytest.raises(ValueError, match="lr_c must be > 0"):
        TrainArgs(out="x", lr_c=0)
