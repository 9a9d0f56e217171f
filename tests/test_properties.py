"""The shared properties, written once, over model family x method x attention backend.

Properties (one test function each; the id of a failure names family-method-backend):

* identity: at a keep-everything budget, logits and greedy `generate` equal the unmodified model's, and
  the stats say every position was kept;
* exact counts: at several budgets each image keeps exactly round(b * n) (or min(k, n)) rows, which is what
  the LLM (or the tower's later blocks) receives, with contiguous positions; LLM-stage methods report the
  tokens present in every decoder layer;
* reference: on a left-padded batch of mixed image sizes (two images in one prompt, a text-only row, text
  before and after an image), forward logits, a manual decode step on the returned cache and greedy
  `generate` equal the hand-built reference of `references.py` run on each sample alone; the stats after
  `generate` still describe the prefill; LLM-stage selections equal the masking reference's;
* eager vs sdpa: the same tokens kept, the same logits and greedy continuation;
* bf16: runs and keeps the exact counts;
* remove: outputs bit-identical after `remove()`, no hook, class swap or `__dict__` entry left, nothing
  changed on the classes or on a second model of the same class.

Supported combinations are listed explicitly in `SUPPORTED` and `BACKENDS` (nothing is skipped at run time
but open_clip without its optional dependency): the Hugging Face families run every method and stack under
eager and sdpa; open_clip towers run hired, visionzip, random and pool (the README's list: no LLM, so no
fastv / pdrop / stacks; no globalcom2), have no `generate` and one attention implementation ("native"), so
they are left out of the eager-vs-sdpa property.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import HAS_OPEN_CLIP, IMAGE_SIZES, OPEN_CLIP_LAYERS, PROMPTS, TEXT_LAYERS, get_model, make_image
from references import (
    cumsum_positions,
    image_refs,
    llm_plan,
    manual_tower,
    model_state,
    qwen_sample_reference,
    sample_embeds,
    sample_reference,
    stats_rows,
    vision_rows,
)

import vlmdrop
from vlmdrop.testing import QWEN_IMAGE

# ---------------------------------------------------------------------------------------------- methods
VISION_METHODS = ("hired", "random", "visionzip", "pool", "globalcom2")
NEW_ROW_METHODS = ("visionzip", "pool")  # the vision-stage methods that make new rows
LLM_METHODS = ("fastv", "pdrop")
SWEEP = (0.05, 0.77, 7, 10_000)  # budgets of the exact-count property: fractions and counts (0.3: other cells)


@dataclass(frozen=True)
class Method:
    spec: str | tuple[str, str]  # a name, or (vision, llm) stacked
    params: dict  # reference / backend / bf16 / remove cells
    full: tuple[dict, ...]  # keep-everything parameters (identity)
    sweep: tuple[dict, ...]  # exact-count parameters


def _vision(name: str, params: dict) -> Method:
    return Method(name, params, ({"budget": 1.0}, {"budget": 10_000}), tuple({**params, "budget": b} for b in SWEEP))


def _stack(vision: str, vparams: dict, llm: str, lparams: dict, full_llm: dict) -> Method:
    return Method((vision, llm), {vision: vparams, llm: lparams},
                  ({vision: {"budget": 1.0}, llm: full_llm},),
                  tuple({vision: {**vparams, "budget": b}, llm: lparams} for b in SWEEP))


METHODS = {
    "hired": _vision("hired", {"budget": 0.3}),
    "random": _vision("random", {"budget": 9, "seed": 3}),
    "visionzip": _vision("visionzip", {"budget": 9, "ratio": 1.0}),  # several contextual tokens per crop
    "pool": _vision("pool", {"budget": 0.3}),
    "globalcom2": _vision("globalcom2", {"budget": 0.25}),
    "fastv": Method("fastv", {"layer": 2, "keep": 0.25},
                    ({"layer": 2, "keep": 1.0}, {"layer": 2, "keep": 10_000}),
                    tuple({"layer": 2, "keep": k} for k in SWEEP)),
    "pdrop": Method("pdrop", {"layers": (1, 3), "ratio": (0.6, 0.5), "positions": "compact"},
                    ({"layers": (1, 3), "ratio": 1.0},),
                    tuple({"layers": (1, 2, 3), "ratio": r} for r in (0.05, 0.3, 0.77, (0.6, 0.5, 0.9)))),
    "pdrop_previous": Method("pdrop", {"layers": (1, 2, 3), "ratio": 0.5, "score_layer": "previous"},
                             ({"layers": (1, 2, 3), "ratio": 1.0, "score_layer": "previous"},),
                             tuple({"layers": (2, 3), "ratio": r, "score_layer": "previous"} for r in (0.3, 0.77))),
    "hired+fastv": _stack("hired", {"budget": 0.4, "alpha": 0.2}, "fastv", {"keep": 0.5}, {"keep": 1.0}),
    "random+pdrop": _stack("random", {"budget": 0.5}, "pdrop", {"layers": (1, 2, 3), "ratio": 0.5},
                           {"layers": (1, 2, 3), "ratio": 1.0}),
    "visionzip+pdrop": _stack("visionzip", {"budget": 0.5}, "pdrop", {"layers": (2, 3), "ratio": 0.5},
                              {"layers": (2, 3), "ratio": 1.0}),
    "pool+fastv": _stack("pool", {"budget": 0.5}, "fastv", {"layer": 1, "keep": 5, "positions": "compact"},
                         {"layer": 1, "keep": 1.0}),
    "globalcom2+fastv": _stack("globalcom2", {"budget": 0.5}, "fastv", {"layer": 3, "keep": 0.3},
                               {"layer": 3, "keep": 1.0}),
}
# M-RoPE families refuse positions="compact" (test_qwen_vl.py): their cells of those two run "original"
COMPACT = ("pdrop", "pool+fastv")
MROPE_METHODS = {
    "pdrop_original": Method("pdrop", {"layers": (1, 3), "ratio": (0.6, 0.5)}, METHODS["pdrop"].full,
                             METHODS["pdrop"].sweep),
    "pool+fastv_original": _stack("pool", {"budget": 0.5}, "fastv", {"layer": 1, "keep": 5},
                                  {"layer": 1, "keep": 1.0}),
}

# ------------------------------------------------------------------------------------------------- grid
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # M-RoPE: kept tokens keep their original positions
HF_FAMILIES = ("llava", "llava_next", "internvl", "llava_onevision") + QWEN_FAMILIES
OPEN_CLIP_FAMILIES = ("open_clip", "open_clip_qknorm")
SUPPORTED = {f: tuple(METHODS) for f in HF_FAMILIES}
SUPPORTED.update({f: tuple(m for m in METHODS if m not in COMPACT) + tuple(MROPE_METHODS) for f in QWEN_FAMILIES})
METHODS.update(MROPE_METHODS)
SUPPORTED.update({f: ("hired", "visionzip", "random", "pool") for f in OPEN_CLIP_FAMILIES})
BACKENDS = {**{f: ("eager", "sdpa") for f in HF_FAMILIES}, **{f: ("native",) for f in OPEN_CLIP_FAMILIES}}
OPEN_CLIP_LAYER = 2  # open_clip: blocks 2.. run on the kept tokens


def _marks(family: str):
    if family in OPEN_CLIP_FAMILIES:
        return [pytest.mark.skipif(not HAS_OPEN_CLIP, reason="needs open_clip and torchvision")]
    return []


CELLS = [pytest.param(f, m, a, id=f"{f}-{m}-{a}", marks=_marks(f))
         for f, methods in SUPPORTED.items() for m in methods for a in BACKENDS[f]]
HF_PAIRS = [pytest.param(f, m, id=f"{f}-{m}") for f in HF_FAMILIES for m in SUPPORTED[f]]


def _stages(method: str, params: dict) -> tuple[tuple[str, dict] | None, tuple[str, dict] | None]:
    """(vision name, params) and (LLM name, params) of a grid method with `params`."""
    spec = METHODS[method].spec
    if isinstance(spec, tuple):
        return (spec[0], params[spec[0]]), (spec[1], params[spec[1]])
    return ((spec, params), None) if spec in VISION_METHODS else (None, (spec, params))


def _count(budget: float | int, n: int) -> int:
    """The documented budget rule: round(b * n), at least 1, for a fraction; min(k, n) for a count."""
    return max(1, round(budget * n)) if isinstance(budget, float) else min(budget, n)


def expected_counts(method: str, params: dict, n_before: int) -> tuple[int, int, list[int]]:
    """(rows the vision stage hands the LLM, tokens kept in the end, tokens present per decoder layer)."""
    vision, llm = _stages(method, params)
    v = _count(vision[1]["budget"], n_before) if vision else n_before
    if llm is None:
        return v, v, []
    plan = llm_plan(*llm)
    per_stage, present = [], v
    for s in range(len(plan.layers)):
        present = plan.keep(s, v, present)
        per_stage.append(present)
    layers = [next((c for k, c in reversed(list(zip(plan.layers, per_stage))) if k <= i), v)
              for i in range(TEXT_LAYERS)]
    return v, present, layers


def _stats_key(images) -> list[tuple]:
    return [(s.sample, s.n_before, s.n_kept, s.kept_indices.tolist(), list(s.crop_budgets), list(s.crop_kept), s.method,
             list(s.layer_tokens), s.n_new, [g.tolist() for g in s.new_groups or []]) for s in images]


# ----------------------------------------------------------------------------------------------- inputs
# per family: image sizes of the reference batch (row 0: two images, row 1: text only, row 2: one image)
GRID_SIZES = {"llava": [(60, 130), (90, 50), (56, 56)],  # 16 tokens each
              "llava_next": [(60, 130), (90, 50), (56, 56)],  # 52, 56, 36 tokens (grids 1x3, 2x1, 1x2)
              "internvl": [(60, 130), (56, 56), (50, 300)],  # 3, 1, 7 tiles -> 48, 16, 112 tokens
              # row 0 is a multi-image prompt (one crop + newline each: 17, 17); (160, 160): a 3x3 grid
              # down-sampled to 8x8 (anyres_max_4) -> 88 tokens
              "llava_onevision": [(60, 130), (90, 50), (160, 160)],
              **{f: [(60, 130), (90, 50), (40, 70)] for f in QWEN_FAMILIES}}  # grids 4x8, 6x3, 2x4 tokens
GRID_PROMPTS = ["USER: <image>\nwhat is the shape ? and <image>\nthe colour ? ASSISTANT:",
                "USER: what color is this ? ASSISTANT:",
                "USER: <image>\nis there a red circle in the picture ? ASSISTANT:"]
# per family: one image per row, for the exact counts (LLaVA-NeXT: six AnyRes grids; InternVL: 1-7 tiles)
COUNT_SIZES = {"llava": IMAGE_SIZES[:3], "llava_next": IMAGE_SIZES,
               "internvl": [(56, 56), (60, 130), (90, 50), (50, 300), (200, 100), (130, 120)],
               # grids 2x3 (down-sampled), 2x1, 3x2 (down-sampled), 2x3, 3x3 (down-sampled), 1x1, 1x3
               "llava_onevision": [(60, 130), (90, 50), (120, 110), (110, 170), (160, 160), (56, 56), (40, 170)],
               **{f: [(56, 56), (60, 130), (90, 50), (50, 300), (200, 100), (130, 120)] for f in QWEN_FAMILIES}}
N_NEW = 4  # generated tokens


def _prompts(family: str, prompts: list[str]) -> list[str]:
    if family in QWEN_FAMILIES:
        return [p.replace("<image>", QWEN_IMAGE) for p in prompts]
    return [p.replace("<image>", "<IMG_CONTEXT>") for p in prompts] if family == "internvl" else prompts


_INPUTS: dict = {}


def _cached(key, build):
    """Processor outputs built once per family (a fresh dict each call: tests may replace entries)."""
    if key not in _INPUTS:
        _INPUTS[key] = build()
    value = _INPUTS[key]
    return value if isinstance(value, torch.Tensor) else dict(value)


def grid_inputs(family: str, proc):
    """The reference batch (or, for open_clip, three random 32 px images)."""
    if family in OPEN_CLIP_FAMILIES:
        return _cached(family, lambda: torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))

    def build():
        images = [make_image(h, w, i) for i, (h, w) in enumerate(GRID_SIZES[family])]
        if family == "llava_onevision":  # images per sample: row 0's two images make a multi-image prompt
            images = [images[:2], [], images[2:]]
        inputs = proc(images=images, text=_prompts(family, GRID_PROMPTS), return_tensors="pt", padding=True)
        assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # three lengths: left padding
        return inputs
    return _cached(("grid", family), build)


def count_inputs(family: str, proc):
    if family in OPEN_CLIP_FAMILIES:
        return grid_inputs(family, proc)

    def build():
        sizes = COUNT_SIZES[family]
        images = [make_image(h, w, i) for i, (h, w) in enumerate(sizes)]
        prompts = _prompts(family, [PROMPTS[i % len(PROMPTS)] for i in range(len(sizes))])
        return proc(images=images, text=prompts, return_tensors="pt", padding=True)
    return _cached(("count", family), build)


def _forward(family: str, model, inputs):
    if family in OPEN_CLIP_FAMILIES:
        return model.encode_image(inputs)
    return model(**inputs).logits


def _generate(family: str, model, inputs):
    if family in OPEN_CLIP_FAMILIES:
        return None
    return model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)


def _images(family: str, model, inputs) -> list[tuple[int, int, int, int]]:
    """(sample, visual positions, content positions, crops) per image, as the unmodified model computes them
    (content: not LLaVA-NeXT's newline rows; crops: LLaVA-NeXT base + grid, InternVL tiles)."""
    if family in OPEN_CLIP_FAMILIES:
        n = model.visual.positional_embedding.shape[0] - 1
        return [(b, n, n, 1) for b in range(inputs.shape[0])]
    return [(im.sample, im.rows.shape[0], int(im.content.sum()), im.crops) for im in image_refs(model, inputs)]


def _n_before(family: str, model, inputs) -> list[tuple[int, int]]:
    """(sample, visual positions) per image."""
    return [im[:2] for im in _images(family, model, inputs)]


def _spec(method: str):
    spec = METHODS[method].spec
    return list(spec) if isinstance(spec, tuple) else spec


def _params(family: str, params: dict) -> dict:
    return {"layer": OPEN_CLIP_LAYER, **params} if family in OPEN_CLIP_FAMILIES else params


# ------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("family,method,attn", CELLS)
def test_full_budget_is_identity(family, method, attn):
    model, proc = get_model(family, attn)
    inputs = grid_inputs(family, proc)
    _, llm = _stages(method, METHODS[method].params)
    with torch.no_grad():
        ref, ref_gen = _forward(family, model, inputs), _generate(family, model, inputs)
        n_before = _n_before(family, model, inputs)
        for i, params in enumerate(METHODS[method].full):
            with vlmdrop.dropping(model, _spec(method), **_params(family, params)) as h:
                out = _forward(family, model, inputs)
                gen = _generate(family, model, inputs) if i == 0 else None  # generate at the first one
            assert torch.equal(out, ref), params
            assert gen is None or torch.equal(gen, ref_gen), params
            assert [(s.sample, s.n_before) for s in h.stats.images] == n_before
            for s in h.stats.images:
                assert s.n_kept == s.n_before and s.n_new == 0 and not s.new_groups, (params, s)
                assert torch.equal(s.kept_indices, torch.arange(s.n_before)), params
                assert s.layer_tokens == ([s.n_before] * TEXT_LAYERS if llm else [])


@pytest.mark.parametrize("family,method,attn", CELLS)
def test_exact_kept_counts(family, method, attn):
    model, proc = get_model(family, attn)
    inputs = count_inputs(family, proc)
    with torch.no_grad():
        images = _images(family, model, inputs)
    for params in METHODS[method].sweep:
        if family in OPEN_CLIP_FAMILIES:
            _check_tower_counts(model, inputs, method, params, images)
        else:
            _check_llm_counts(model, inputs, method, params, images)


def _check_image_stats(s, method: str, params: dict, image: tuple[int, int, int, int]) -> int:
    """The per-image stats at `params` (`image` from `_images`); returns the rows the vision stage hands on."""
    vision, llm = _stages(method, params)
    sample, n, n_content, crops = image
    v, final, layers = expected_counts(method, params, n)
    assert (s.sample, s.n_before) == (sample, n) and s.n_kept == final, (params, s.n_before, s.n_kept, final)
    if vision is None or vision[0] not in NEW_ROW_METHODS:
        assert s.n_new == 0 and not s.new_groups, params  # only visionzip and pool make new rows
    k = s.kept_indices
    assert k.dtype == torch.long and k.numel() == s.n_kept - s.n_new, params
    assert torch.all(k[1:] > k[:-1]) and (k.numel() == 0 or 0 <= int(k.min()) <= int(k.max()) < n), params
    groups = s.new_groups or []
    assert len(groups) == s.n_new, params
    for g in groups:  # a new row summarises original positions, none of them kept as they are
        assert g.numel() > 0 and 0 <= int(g.min()) and int(g.max()) < n and not torch.isin(g, k).any(), params
    assert s.layer_tokens == layers, (params, s.layer_tokens, layers)
    if vision is None:
        assert s.crop_budgets == [] and s.crop_kept == [], params
    else:
        assert s.crop_budgets == s.crop_kept and len(s.crop_budgets) == crops, (params, s.crop_budgets, crops)
        # the shares sum to the budget, spent on content rows (LLaVA-NeXT's newline rows only on overflow)
        assert sum(s.crop_budgets) == min(v, n_content), (params, s.crop_budgets, v, n_content)
    spec = METHODS[method].spec
    assert s.method == ("+".join(spec) if isinstance(spec, tuple) else spec), (s.method, spec)
    return v


def _check_llm_counts(model, inputs, method, params, images):
    seen = {}
    lm = model.model.language_model
    with torch.no_grad(), vlmdrop.dropping(model, _spec(method), **params) as h:
        # registered after vlmdrop's hooks: sees what the language model really receives
        hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    assert len(h.stats.images) == len(images), params
    rows = [0] * inputs["input_ids"].shape[0]
    vision, _ = _stages(method, params)
    for s, image in zip(h.stats.images, images):
        rows[s.sample] += _check_image_stats(s, method, params, image)
    image_id = model.config.image_token_id
    mask = seen["attention_mask"]
    assert mask.dim() == 2, mask.shape
    expect = [int(inputs["attention_mask"][b].sum()) - int((inputs["input_ids"][b] == image_id).sum()) + rows[b]
              for b in range(len(rows))]  # text tokens + the image rows handed on
    assert mask.sum(1).tolist() == expect, params
    # today the sequence is shorter by the smallest removal of any row (shorter rows are re-padded on the left)
    removed = [int(inputs["attention_mask"][b].sum()) - n for b, n in enumerate(expect)]
    assert seen["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] - min(removed), params
    for b, n in enumerate(expect):
        assert bool(mask[b, mask.shape[1] - n:].all()), params  # left padding
    pos = seen.get("position_ids")
    if vision is not None and pos is not None and pos.dim() == 2:  # (M-RoPE keeps positions: test_qwen_vl.py)
        for b in range(len(rows)):
            p = pos[b][mask[b].bool()]
            assert torch.all(p[1:] - p[:-1] == 1), (params, p)  # contiguous: no gap where rows were removed


def _check_tower_counts(model, x, method, params, images):
    blocks = model.visual.transformer.resblocks
    for layer in (1, OPEN_CLIP_LAYER, -1):
        seen = []
        with torch.no_grad(), vlmdrop.dropping(model, _spec(method), layer=layer, **params) as h:
            # probes registered after vlmdrop's hooks see what each block really receives
            probes = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in blocks]
            try:
                model.encode_image(x)
            finally:
                for p in probes:
                    p.remove()
        n = images[0][1]
        v = _count(params["budget"], n)
        lay = layer % OPEN_CLIP_LAYERS
        assert seen == [1 + n] * lay + [1 + v] * (OPEN_CLIP_LAYERS - lay), (params, layer, seen)
        assert len(h.stats.images) == len(images)
        for s, image in zip(h.stats.images, images):
            _check_image_stats(s, method, params, image)


@pytest.mark.parametrize("family,method,attn", CELLS)
def test_forward_and_generate_equal_reference(family, method, attn):
    if family in OPEN_CLIP_FAMILIES:
        return _check_tower_reference(family, method)
    model, proc = get_model(family, attn)
    params = METHODS[method].params
    vision, llm = _stages(method, params)
    ref_model = get_model(family, "eager")[0] if llm else model  # the masking reference needs attention weights
    inputs = grid_inputs(family, proc)
    mask, L = inputs["attention_mask"], inputs["input_ids"].shape[1]
    qwen = family in QWEN_FAMILIES  # M-RoPE: the model's own positions, at prefill and at the manual step
    pos = cumsum_positions(mask)
    with torch.no_grad():
        with vlmdrop.dropping(model, _spec(method), **params) as h:
            out = model(**inputs, use_cache=True) if qwen else model(**inputs, position_ids=pos, use_cache=True)
            prefill = _stats_key(h.stats.images)
            stats = list(h.stats.images)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            # M-RoPE: one past each row's largest position (transformers 5.24's Qwen-VL cannot derive it at a
            # cached step given the full mask: its compute_3d_position_ids does not slice to the new token)
            step_pos = {"position_ids": _next_mrope(model, inputs)} if qwen else {"position_ids": pos[:, -1:] + 1}
            step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                         cache=out.cache, **step_pos).logits[:, -1]
            gen = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
            assert _stats_key(h.stats.images) == prefill  # decode steps never overwrite the prefill's stats
        if vision and llm:  # the vision stage alone (its own cells check it), then the LLM stage by masking
            with vlmdrop.dropping(ref_model, vision[0], **vision[1]) as hv:
                ref_model(**inputs)
            vstats = list(hv.stats.images)
        else:
            vstats = stats if vision else None
        images = image_refs(ref_model, inputs)
        assert [(s.sample, s.n_before) for s in stats] == [(im.sample, im.rows.shape[0]) for im in images]
        assert [im.sample for im in images] == [0, 0, 2]
        rows = ([vision_rows(ref_model, im, vs) for im, vs in zip(images, vstats)] if vstats
                else [im.rows for im in images])
        plan = llm_plan(*llm) if llm else None
        assert torch.equal(gen[:, :L], inputs["input_ids"])
        for b in range(mask.shape[0]):
            if qwen:  # kept rows at their original M-RoPE positions (and DeepStack rows at the same rows)
                ref = qwen_sample_reference(ref_model, inputs, b, images, vstats, plan, n_new=N_NEW,
                                            next_token=int(nxt[b]))
                n = ref.logits.shape[0]
            else:
                emb, spans = sample_embeds(ref_model, inputs, b, images, rows)
                ref = sample_reference(ref_model, emb, spans, plan, n_new=N_NEW, next_token=int(nxt[b]))
                n = emb.shape[1]
            torch.testing.assert_close(out.logits[b, -n:][ref.live], ref.logits[ref.live], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step[b], ref.step_logits, atol=1e-4, rtol=1e-4)
            assert gen[b, L:].tolist() == ref.tokens, b
            if plan is None:
                continue
            for i, kept in zip([i for i, im in enumerate(images) if im.sample == b], ref.kept):
                s, v = stats[i], (vstats[i] if vstats else None)
                orig = v.kept_indices if v else torch.arange(images[i].rows.shape[0])
                new = kept[kept >= orig.numel()] - orig.numel()
                assert s.kept_indices.tolist() == orig[kept[kept < orig.numel()]].tolist()  # indices into n_before
                assert s.n_kept == kept.numel() and s.n_new == new.numel()
                assert [g.tolist() for g in s.new_groups or []] == [v.new_groups[j].tolist() for j in new.tolist()]
                if v is not None:  # the vision stage's per-crop accounting
                    assert (s.crop_budgets, s.crop_kept) == (v.crop_budgets, v.crop_kept)


def _next_mrope(model, inputs) -> torch.Tensor:
    """(3, B, 1) the unmodified model's M-RoPE position of the token after the prompt."""
    pos, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])  # (3, B, L)
    return pos.amax(dim=(0, 2))[None, :, None].expand(3, -1, -1) + 1


def _check_tower_reference(family, method):
    model, _ = get_model(family, "native")
    x = grid_inputs(family, None)
    with torch.no_grad():
        with vlmdrop.dropping(model, method, **_params(family, METHODS[method].params)) as h:
            out = model.encode_image(x)
        ref, _ = manual_tower(model.visual, x, OPEN_CLIP_LAYER, stats_rows(h.stats))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, model.encode_image(x))  # something was dropped


@pytest.mark.parametrize("family,method", HF_PAIRS)
def test_eager_and_sdpa_agree(family, method):
    res = {}
    for attn in ("sdpa", "eager"):
        model, proc = get_model(family, attn)
        assert model.config.vision_config._attn_implementation == attn
        assert model.config.text_config._attn_implementation == attn
        inputs = grid_inputs(family, proc)
        with torch.no_grad(), vlmdrop.dropping(model, _spec(method), **METHODS[method].params) as h:
            logits = model(**inputs).logits[:, -1]
            gen = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
        res[attn] = (_stats_key(h.stats.images), logits, gen)
    assert res["sdpa"][0] == res["eager"][0]
    torch.testing.assert_close(res["sdpa"][1], res["eager"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(res["sdpa"][2], res["eager"][2])


@pytest.mark.parametrize("family,method,attn", CELLS)
def test_bf16_keeps_exact_counts(family, method, attn):
    model, proc = get_model(family, attn, torch.bfloat16)  # its own copy: the fp32 weights stay as they are
    params = METHODS[method].params
    inputs = grid_inputs(family, proc)
    with torch.no_grad():
        n_before = _n_before(family, get_model(family, attn)[0], inputs)
        if family in OPEN_CLIP_FAMILIES:
            inputs = inputs.to(torch.bfloat16)
        else:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with vlmdrop.dropping(model, _spec(method), **_params(family, params)) as h:
            if family in OPEN_CLIP_FAMILIES:
                out = model.encode_image(inputs)
                assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            else:
                gen = _generate(family, model, inputs)
                assert gen.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + N_NEW)
    assert [(s.sample, s.n_before) for s in h.stats.images] == n_before
    for s in h.stats.images:
        assert s.n_kept == expected_counts(method, params, s.n_before)[1]


@pytest.mark.parametrize("family,method,attn", CELLS)
def test_remove_restores_model_exactly(family, method, attn):
    model, proc = get_model(family, attn)
    # a second model of the same classes: nothing vlmdrop does may reach it
    twin = get_model({"open_clip": "open_clip_qknorm", "open_clip_qknorm": "open_clip"}[family], "native")[0] \
        if family in OPEN_CLIP_FAMILIES else get_model(family, "eager" if attn == "sdpa" else "sdpa")[0]
    inputs = grid_inputs(family, proc)
    with torch.no_grad():
        ref, ref_gen = _forward(family, model, inputs), _generate(family, model, inputs)
        before, twin_before = model_state(model), model_state(twin)
        h = vlmdrop.apply(model, _spec(method), **_params(family, METHODS[method].params))
        during = model_state(model)
        assert during["modules"] != before["modules"]  # installed on this instance
        assert {c: during["classes"][c] for c in before["classes"]} == before["classes"]  # no class patched
        assert model_state(twin) == twin_before
        assert not torch.equal(_forward(family, model, inputs), ref)
        _generate(family, model, inputs)
        h.remove()
        h.remove()  # idempotent
        assert not h.active
        assert model_state(model) == before
        assert torch.equal(_forward(family, model, inputs), ref)
        gen = _generate(family, model, inputs)
        assert gen is None or torch.equal(gen, ref_gen)
