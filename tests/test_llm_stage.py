"""LLM prefill-stage dropping (FastV, PyramidDrop) on the real transformers classes.

The reference is written here, independently of the engine: the unmodified eager model, whose
attention weights of layer K−1 (FastV, `pdrop(score_layer="previous")`) or of layer K itself with
the earlier drops only (PyramidDrop's official rule: layer K's q/k on its un-reduced input) rank the
image tokens (last prompt token's row, mean over heads), and where the tokens dropped at layer K are
masked out as keys of every layer ≥ K (positions unchanged, or renumbered for "compact") — no
shortened sequence, no hooks of the library.
"""

import pytest
import torch

import vlmdrop
from vlmdrop.zoo.tiny import tiny_llava, tiny_llava_next

from conftest import PROMPTS, batch, make_image

MIXED = [(60, 130), (90, 50), (56, 56)]  # LLaVA-NeXT: 52, 56, 36 image tokens -> left padding
N_LAYERS = 4
_MODELS: dict = {}


def model_of(kind: str, attn: str = "sdpa"):
    key = (kind, attn)
    if key not in _MODELS:
        build = {"llava": tiny_llava, "llava_next": tiny_llava_next}[kind]
        _MODELS[key] = build(text_layers=N_LAYERS, attn_implementation=attn)
    return _MODELS[key]


@pytest.fixture(params=["llava", "llava_next"])
def kind(request):
    return request.param


# ----------------------------------------------------------------------------------- reference
def _keep_fastv(keep):
    def n_keep(stage, n_before, n_present):
        return min(n_present, max(1, round(keep * n_present))) if isinstance(keep, float) else min(keep, n_present)
    return n_keep


def _keep_pdrop(ratio):
    def n_keep(stage, n_before, n_present):
        return min(n_present, max(1, round(n_before * ratio ** (stage + 1))))
    return n_keep


class MaskReference:
    """Tokens dropped at stage s are masked out as keys in layers >= K_s of the unmodified eager model."""

    def __init__(self, model, drop_layers, positions="original"):
        self.model, self.lm = model, model.model.language_model
        self.drop_layers, self.positions = drop_layers, positions
        self.dropped: list[torch.Tensor] = []  # per stage, (B, L) cumulative
        self.handles = []

    def __enter__(self):
        for i in range(self.drop_layers[0], len(self.lm.layers)):
            self.handles.append(self.lm.layers[i].register_forward_pre_hook(self._pre(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _pre(self, i):
        def hook(module, args, kwargs):
            stages = [s for s, k in enumerate(self.drop_layers[: len(self.dropped)]) if k <= i]
            if not stages:
                return None
            d = self.dropped[stages[-1]]  # (B, L)
            length = d.shape[1]
            mask = kwargs["attention_mask"].clone()  # (B, 1, q, kv) additive
            assert mask.dtype.is_floating_point
            mask[..., :length] = mask[..., :length].masked_fill(d[:, None, None, :], torch.finfo(mask.dtype).min)
            kwargs = dict(kwargs, attention_mask=mask)
            if self.positions == "compact":
                pos = kwargs["position_ids"].expand(d.shape[0], -1)
                if pos.shape[1] == length:  # prefill: each token moves back by the dropped ones before it
                    pos = pos - (d.long().cumsum(1) - d.long())
                else:
                    pos = pos - d.long().sum(1, keepdim=True)
                kwargs["position_ids"] = pos
                kwargs["position_embeddings"] = self.lm.rotary_emb(args[0], pos)
            return args, kwargs

        return hook


def lm_input_ids(model, inputs):
    """input_ids as the language model receives them (after any vision-stage compaction)."""
    seen = {}
    def grab(module, args, kwargs):
        seen.setdefault("ids", kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0])

    h = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["ids"]


def reference_drop(model, inputs, counts, drop_layers, n_keep, positions="original", score="previous"):
    """Run the reference selection stage by stage; returns (MaskReference, kept indices per image).
    `score`: "previous" ranks the drop at K by layer K−1's attention weights, "current" by layer K's
    (in the pass where only the earlier stages' drops are masked, i.e. layer K on its un-reduced input)."""
    ids = lm_input_ids(model, inputs)
    rows, cols = (ids == model.config.image_token_id).nonzero(as_tuple=True)
    images, off = [], 0
    for n in counts:
        images.append((int(rows[off]), cols[off:off + n]))
        off += n
    present = [torch.arange(n) for n in counts]
    ref = MaskReference(model, drop_layers, positions)
    for s, k in enumerate(drop_layers):
        cap = {}
        def grab(module, args, out):
            cap.setdefault("w", out[1])

        scorer = k - 1 if score == "previous" else k
        h = model.model.language_model.layers[scorer].self_attn.register_forward_hook(grab)
        try:
            with torch.no_grad(), ref:
                model(**inputs)
        finally:
            h.remove()
        row = cap["w"][:, :, -1, :].float().mean(dim=1)  # (B, L): last prompt token, mean over heads
        d = ref.dropped[-1].clone() if ref.dropped else torch.zeros(ids.shape, dtype=torch.bool)
        for i, (b, pos) in enumerate(images):
            p = pos[present[i]]
            keep = n_keep(s, len(pos), len(p))
            order = torch.sort(row[b, p], descending=True, stable=True).indices
            kept = order[:keep].sort().values
            gone = torch.ones(len(p), dtype=torch.bool)
            gone[kept] = False
            d[b, p[gone]] = True
            present[i] = present[i][kept]
        ref.dropped.append(d)
    return ref, present


def _kept_positions(ref):
    """(B, L) True where a position survives the last drop."""
    return ~ref.dropped[-1]


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method,params", [("fastv", {"layer": 2, "keep": 1.0}),
                                           ("pdrop", {"layers": (1, 3), "ratio": 1.0})])
def test_keep_everything_is_identity(kind, method, params):
    model, proc = model_of(kind)
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlmdrop.dropping(model, method, **params) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref, out) and torch.equal(ref_gen, gen)
    for s in h.stats.images:
        assert s.n_kept == s.n_before and s.layer_tokens == [s.n_before] * N_LAYERS
        assert torch.equal(s.kept_indices, torch.arange(s.n_before))


@pytest.mark.parametrize("method,params,positions", [
    ("fastv", {"layer": 2, "keep": 0.25}, "original"),
    ("fastv", {"layer": 1, "keep": 5}, "compact"),
    ("pdrop", {"layers": (1, 2, 3), "ratio": 0.5}, "original"),
    ("pdrop", {"layers": (2, 3), "ratio": (0.6, 0.5)}, "compact"),
    ("pdrop", {"layers": (1, 2, 3), "ratio": 0.5, "score_layer": "previous"}, "original"),
    ("pdrop", {"layers": (2, 3), "ratio": (0.6, 0.5), "score_layer": "previous"}, "compact"),
])
def test_forward_and_generate_equal_masking_reference(kind, method, params, positions):
    model, proc = model_of(kind)
    ref_model, _ = model_of(kind, "eager")
    inputs = batch(proc, MIXED)
    n_new = 4
    score = params.get("score_layer", "current") if method == "pdrop" else "previous"
    with torch.no_grad():
        with vlmdrop.dropping(model, method, positions=positions, **params) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        counts = [s.n_before for s in h.stats.images]
        if method == "fastv":
            layers, n_keep = [params["layer"]], _keep_fastv(params["keep"])
        else:
            ratio = params["ratio"]
            layers = list(params["layers"])
            if isinstance(ratio, tuple):
                def n_keep(stage, n_before, n_present, r=ratio):
                    frac = 1.0
                    for x in r[: stage + 1]:
                        frac *= x
                    return min(n_present, max(1, round(n_before * frac)))
            else:
                n_keep = _keep_pdrop(ratio)
        ref, kept = reference_drop(ref_model, inputs, counts, layers, n_keep, positions, score=score)
        assert [s.kept_indices.tolist() for s in h.stats.images] == [k.tolist() for k in kept]
        with ref:
            ref_out = ref_model(**inputs).logits
            ref_gen = ref_model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    # logits agree wherever a real token survives (a dropped position's logits carry no meaning)
    keep = _kept_positions(ref) & inputs["attention_mask"].bool()
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out[keep], ref_out[keep], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)
    for s, k in zip(h.stats.images, kept):
        assert s.n_kept == len(k) and len(s.layer_tokens) == N_LAYERS
        assert s.layer_tokens[: layers[0]] == [s.n_before] * layers[0] and s.layer_tokens[-1] == s.n_kept


def test_layer_tokens_and_exact_counts():
    model, proc = model_of("llava_next")
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        with vlmdrop.dropping(model, "pdrop", layers=[1, 3], ratio=0.5) as h:
            model(**inputs)
        for s in h.stats.images:
            n = s.n_before
            assert s.layer_tokens == [n, round(n / 2), round(n / 2), round(n / 4)]
            assert s.n_kept == round(n / 4) and s.kept_indices.numel() == s.n_kept
            assert torch.all(s.kept_indices[1:] > s.kept_indices[:-1])
        with vlmdrop.dropping(model, "fastv", layer=3, keep=7) as h:
            model(**inputs)
        assert [s.layer_tokens for s in h.stats.images] == [[s.n_before] * 3 + [7] for s in h.stats.images]


def test_eager_and_sdpa_agree(kind):
    inputs = batch(model_of(kind)[1], MIXED)
    res = {}
    for attn in ("sdpa", "eager"):
        model, _ = model_of(kind, attn)
        with torch.no_grad(), vlmdrop.dropping(model, "pdrop", layers=(1, 2), ratio=0.5) as h:
            logits = model(**inputs).logits[:, -1]
            gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        res[attn] = ([s.kept_indices.tolist() for s in h.stats.images], logits, gen)
    assert res["sdpa"][0] == res["eager"][0]
    torch.testing.assert_close(res["sdpa"][1], res["eager"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(res["sdpa"][2], res["eager"][2])


def test_batch_spans_text_after_image_two_images_and_text_only_row():
    """Per-sample spans: text before and after each image, two images in one prompt, a text-only row."""
    model, proc = model_of("llava_next")
    ref_model, _ = model_of("llava_next", "eager")
    imgs = [make_image(60, 130, 0), make_image(90, 50, 1), make_image(56, 56, 2)]
    prompts = ["USER: <image>\nwhat is the shape ? and <image>\nthe colour ? ASSISTANT:",
               "USER: what color ? ASSISTANT:",
               "USER: <image>\nis there a red circle in the picture ? ASSISTANT:"]
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        with vlmdrop.dropping(model, "fastv", layer=2, keep=0.3) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert [s.sample for s in h.stats.images] == [0, 0, 2]
        counts = [s.n_before for s in h.stats.images]
        ref, kept = reference_drop(ref_model, inputs, counts, [2], _keep_fastv(0.3))
        assert [s.kept_indices.tolist() for s in h.stats.images] == [k.tolist() for k in kept]
        with ref:
            ref_out = ref_model(**inputs).logits
            ref_gen = ref_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    keep = _kept_positions(ref) & inputs["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref_out[keep], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


def test_manual_decode_loop_on_reduced_cache():
    model, proc = model_of("llava")
    ref_model, _ = model_of("llava", "eager")
    inputs = batch(proc, MIXED[:2], prompts=PROMPTS[:2])
    with torch.no_grad():
        with vlmdrop.dropping(model, "fastv", layer=1, keep=0.5) as h:
            out = model(**inputs)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
            step = model(input_ids=nxt, attention_mask=mask, cache=out.cache)
        ref, _ = reference_drop(ref_model, inputs, [s.n_before for s in h.stats.images], [1], _keep_fastv(0.5))
        with ref:
            r = ref_model(**inputs)
            r_step = ref_model(input_ids=nxt, attention_mask=mask, cache=r.cache)
    torch.testing.assert_close(step.logits[:, -1], r_step.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_stacked_vision_and_llm_stage(kind):
    model, proc = model_of(kind)
    ref_model, _ = model_of(kind, "eager")
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        with vlmdrop.dropping(model, ["hired", "fastv"], hired={"budget": 0.4}, fastv={"keep": 0.5}) as h:
            gen = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert h.method == "hired+fastv"
        with vlmdrop.dropping(ref_model, "hired", budget=0.4) as hv:
            ref_model(**inputs)
            vis = [s.kept_indices for s in hv.stats.images]
            counts = [s.n_kept for s in hv.stats.images]
            ref, kept = reference_drop(ref_model, inputs, counts, [2], _keep_fastv(0.5))
            with ref:
                ref_gen = ref_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(gen, ref_gen)
    for s, v, k in zip(h.stats.images, vis, kept):
        assert s.method == "hired+fastv" and s.n_kept == round(0.5 * len(v))
        assert s.kept_indices.tolist() == v[k].tolist()  # indices into n_before of the surviving tokens
        assert s.layer_tokens == [len(v)] * 2 + [s.n_kept] * 2
        assert sum(s.crop_kept) == len(v)  # the vision stage's per-crop accounting


@pytest.mark.parametrize("vision,vparams", [("visionzip", {"budget": 0.5}), ("pool", {"budget": 0.5})])
def test_stacked_new_row_method_and_llm_stage(vision, vparams):
    """A vision stage that makes new rows (merged / pooled) stacked with FastV: the LLM stage ranks
    every visual row, and the stats split the survivors into original positions and new rows."""
    model, proc = model_of("llava_next")
    ref_model, _ = model_of("llava_next", "eager")
    inputs = batch(proc, MIXED)
    with torch.no_grad():
        with vlmdrop.dropping(model, [vision, "fastv"], **{vision: vparams, "fastv": {"keep": 0.5}}) as h:
            gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        with vlmdrop.dropping(ref_model, vision, **vparams) as hv:
            ref_model(**inputs)
            base = list(hv.stats.images)
            ref, kept = reference_drop(ref_model, inputs, [s.n_kept for s in base], [2], _keep_fastv(0.5))
            with ref:
                ref_gen = ref_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(gen, ref_gen)
    for s, b, k in zip(h.stats.images, base, kept):
        n_orig = b.kept_indices.numel()
        assert b.n_new > 0 and s.n_kept == round(0.5 * b.n_kept) == len(k)
        assert s.kept_indices.tolist() == b.kept_indices[k[k < n_orig]].tolist()
        assert s.n_new == int((k >= n_orig).sum()) and len(s.new_groups) == s.n_new
        assert s.n_kept == s.kept_indices.numel() + s.n_new


def _hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), type(m)) for n, m in model.named_modules()}


@pytest.mark.parametrize("method,params", [("fastv", {"layer": 2, "keep": 0.3}),
                                           (["random", "pdrop"], {"random": {"budget": 0.5}, "pdrop": {"layers": [1, 2]}})])
def test_remove_restores_model_exactly(method, params):
    model, proc = model_of("llava_next")
    inputs = batch(proc, MIXED)
    before = _hooks(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h = vlmdrop.apply(model, method, **params)
        assert _hooks(model) != before
        model.generate(**inputs, max_new_tokens=4)
        h.remove()
        h.remove()
        assert _hooks(model) == before
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


@pytest.mark.parametrize("method,params,match", [
    ("fastv", {"layer": 4}, r"layer=4 is out of range .* 4 decoder layers \(valid: 1\.\.3"),
    ("fastv", {"layer": 0}, r"layer=0 must be an int >= 1"),
    ("fastv", {"keep": 0.0}, r"keep=0\.0"),
    ("fastv", {"keep": 1.5}, r"keep=1\.5"),
    ("fastv", {"keep": -3}, r"keep=-3"),
    ("fastv", {"positions": "abs"}, r"positions='abs' .* original, compact"),
    ("pdrop", {}, r"layers=8 is out of range"),
    ("pdrop", {"layers": (2, 1)}, r"strictly increasing"),
    ("pdrop", {"layers": (1, 2), "ratio": (0.5,)}, r"ratio=\(0\.5,\) has 1 values but layers"),
    ("pdrop", {"layers": (1, 2), "ratio": 1.5}, r"ratio=1\.5"),
    ("pdrop", {"layers": (1, 2), "ratio": 10**400}, r"every ratio must be a number in \(0, 1\]"),
    ("pdrop", {"layers": (1, 2), "score_layer": "next"}, r"score_layer='next' is not valid; choose one of: current, previous"),
    ("pdrop", {"layers": (1, 4)}, r"layers=4 is out of range .* 4 decoder layers \(valid: 1\.\.3\)"),
    ("pdrop", {"layers": (1, 4), "score_layer": "previous"}, r"layers=4 is out of range .* layer K is scored by layer K-1"),
    (["hired", "random"], {}, r"all vision-stage methods"),
    (["fastv", "pdrop"], {}, r"all llm-stage methods"),
    (["hired", "fastv"], {"budget": 0.2}, r"unexpected keyword\(s\) \['budget'\]"),
    (["hired", "fastv"], {"fastv": 0.5}, r"fastv=0\.5: the parameters of 'fastv' must be a dict"),
    (["hired", "fastv"], {"fastv": {"keepp": 1}}, r"unknown parameter\(s\) \['keepp'\] for method 'fastv'"),
    (["hired", "hired"], {}, r"names a method twice"),
])
def test_bad_parameters(method, params, match):
    model, _ = model_of("llava")
    before = _hooks(model)
    with pytest.raises(ValueError, match=match):
        vlmdrop.apply(model, method, **params)
    assert _hooks(model) == before and model.__dict__.get("_vlmdrop_handle") is None


def test_prompt_ending_with_image_is_an_error():
    model, proc = model_of("llava")
    inputs = batch(proc, [(56, 56)], prompts=["USER: what ? <image>"])
    with torch.no_grad(), vlmdrop.dropping(model, "fastv", keep=0.5):
        with pytest.raises(ValueError, match="last prompt token .* is an image token"):
            model(**inputs)


def test_bf16_sampling_no_cache_and_labels():
    model, proc = tiny_llava_next(text_layers=N_LAYERS)  # its own copy: bf16 rounding must not leak
    inputs = batch(proc, MIXED)
    with torch.no_grad(), vlmdrop.dropping(model, "fastv", layer=2, keep=0.5) as h:
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
        out = model(**inputs, labels=labels, use_cache=False)
        assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.loss)
        outs = []
        for _ in range(2):
            torch.manual_seed(5)
            outs.append(model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=10))
        assert torch.equal(outs[0], outs[1])
        model.to(torch.bfloat16)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert [s.n_kept for s in h.stats.images] == [round(s.n_before / 2) for s in h.stats.images]
