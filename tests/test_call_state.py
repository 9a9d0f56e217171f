"""Per-call state: a failed forward leaves nothing for the next call, and two threads' overlapping
prefills on one patched model each get their own single-threaded result.

The models here are configured unlike the shared fixtures (other seeds, 4 ViT layers, 3 decoder
layers) and are patched only inside these tests.
"""

import threading

import pytest
import torch
from conftest import batch, get_model

import vlmdrop

N_NEW = 5
PROMPTS = {"llava": ["USER: <image>\nwhat is the shape ? ASSISTANT:",
                     "USER: <image>\nis there a red circle in the picture ? ASSISTANT:"],
           "internvl": ["USER: <IMG_CONTEXT>\nwhat is the shape ? ASSISTANT:",
                        "USER: <IMG_CONTEXT>\nis there a red circle in the picture ? ASSISTANT:"]}
TEXT_ONLY = "USER: what color is the circle ? ASSISTANT:"
# two calls of different shapes: A = a left-padded batch of two images, B = one other image
SIZES_A, SIZES_B = [(60, 130), (90, 50)], [(120, 110)]

METHODS = {
    "vision": ("hired", {"budget": 0.3}),
    "llm": ("fastv", {"layer": 1, "keep": 0.4}),
    "stacked": (["visionzip", "pdrop"], {"visionzip": {"budget": 0.5}, "pdrop": {"layers": [1, 2], "ratio": 0.5}}),
}
SEEDS = {"llava": 11, "llava_next": 12, "internvl": 13}


def model_of(family):
    return get_model(family, seed=SEEDS[family], vision_layers=4, text_layers=3)


def _inputs(family, proc, sizes, seed):
    prompts = PROMPTS["internvl" if family == "internvl" else "llava"]
    return batch(proc, sizes, prompts=[prompts[(seed + i) % 2] for i in range(len(sizes))], seed=seed)


def vit_layers(model):
    encoder = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer  # CLIP | InternVL ViT


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)


def _stats(handle):
    return [(s.sample, s.n_before, s.n_kept, s.kept_indices.tolist(), s.n_new, s.layer_tokens)
            for s in handle.stats.images]


# ------------------------------------------------------------------------------ failed forwards
class _Boom(RuntimeError):
    pass


def _fail(model, inputs, where):
    """A forward on `inputs` that fails at `where`: before the language model runs (transformers refuses
    input_ids with inputs_embeds), inside a decoder layer during the prefill, or inside the vision tower."""
    handles = []

    def boom(*_):
        raise _Boom(where)

    if where == "decoder_layer":
        handles.append(model.model.language_model.layers[-1].register_forward_pre_hook(boom))
    elif where == "vision_tower":
        handles.append(vit_layers(model)[1].register_forward_hook(boom))
    try:
        with torch.no_grad():
            if where == "before_lm":
                emb = model.get_input_embeddings()(inputs["input_ids"])
                with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
                    model(**inputs, inputs_embeds=emb)
            else:
                with pytest.raises(_Boom):
                    model(**inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("where", ["before_lm", "decoder_layer", "vision_tower"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_failed_forward_leaves_no_state(family, method, where):
    model, proc = model_of(family)
    name, params = METHODS[method]
    a, b = _inputs(family, proc, SIZES_A, 0), _inputs(family, proc, SIZES_B, 5)
    text = proc.tokenizer([TEXT_ONLY], return_tensors="pt")
    with torch.no_grad():
        text_ref = model(**text).logits  # the unpatched model
    with vlmdrop.dropping(model, name, **params) as h:
        ref_a = _generate(model, a)
        stats_a = _stats(h)
        ref_b = _generate(model, b)
        stats_b = _stats(h)
        assert stats_a != stats_b
        _fail(model, a, where)
        assert _stats(h) == stats_b  # a failed call publishes no stats
        with torch.no_grad():
            assert torch.equal(model(**text).logits, text_ref)  # nothing of A's prefill is applied to it
        assert _stats(h) == stats_b
        _fail(model, a, where)
        assert torch.equal(_generate(model, b), ref_b) and _stats(h) == stats_b  # another shape
        _fail(model, a, where)
        assert torch.equal(_generate(model, a), ref_a) and _stats(h) == stats_a


# ------------------------------------------------------------------------------------- threads
def _overlap_hooks(model, barrier):
    """Hooks that hold each of two threads at three points of its prefill until the other arrives:
    inside the vision tower (both encoding), between the top-level pre-hooks and the language model
    (embedding lookup), and inside the language model (before its last layer)."""

    def meet(*_):
        barrier.wait()

    def meet_prefill(module, args, *_):
        if args and args[0].shape[1] > 1:  # prefill only: each thread passes each point once
            barrier.wait()

    lm = model.model.language_model
    return [vit_layers(model)[-1].register_forward_hook(meet),
            lm.embed_tokens.register_forward_hook(meet_prefill),
            lm.layers[-1].register_forward_pre_hook(meet_prefill)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_two_threads_with_overlapping_prefills(family, method):
    model, proc = model_of(family)
    name, params = METHODS[method]
    inputs = [_inputs(family, proc, SIZES_A, 0), _inputs(family, proc, SIZES_B, 5)]
    with vlmdrop.dropping(model, name, **params) as h:
        alone, alone_stats = [], []
        for x in inputs:
            alone.append(_generate(model, x))
            alone_stats.append(_stats(h))
        barrier = threading.Barrier(2, timeout=60)
        hooks = _overlap_hooks(model, barrier)
        got, errors = [None, None], []

        def run(i):
            try:
                got[i] = _generate(model, inputs[i])
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        finally:
            for hk in hooks:
                hk.remove()
        assert not any(t.is_alive() for t in threads)
        if errors:
            raise errors[0]
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
        assert _stats(h) in alone_stats  # the last completed prefill's stats, never a mix of the two


# ------------------------------------------------------------------ generate's k-fold expansion
@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_beam_expansion_keeps_each_images_description(family):
    """`generate(num_beams=2)` encodes once and repeats each sample's images (InternVL: its tiles, in a new
    tensor): every copy is described as the image it repeats, so budget 1.0 is the unpatched beam search
    (scores included) and a smaller budget keeps, in every copy, the tokens the image keeps alone."""
    model, proc = model_of(family)
    x = _inputs(family, proc, SIZES_A, 0)  # multi-tile / multi-crop images of different sizes
    beams = dict(max_new_tokens=3, num_beams=2, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**x, **beams)
        with vlmdrop.dropping(model, "hired", budget=1.0):
            out = model.generate(**x, **beams)
        with vlmdrop.dropping(model, "hired", budget=0.3) as h:
            model(**x)
            alone = [s.kept_indices.tolist() for s in h.stats.images]
            model.generate(**x, **beams)
            copies = [s.kept_indices.tolist() for s in h.stats.images]
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)
    assert copies == [k for k in alone for _ in range(2)]
