"""Hand-built references, written once for every test file.

Nothing here runs vlmdrop: each reference is the *unmodified* model fed by hand, driven only by the public
`handle.stats` (which rows were kept, which positions a new row summarises) and the models' own public
functions (`get_image_features`, `pack_image_features`, `multi_modal_projector`, `get_input_embeddings`,
the decoder layers, the open_clip blocks).

* Vision stage: `image_refs` (each image's unmodified visual rows, and the projector's input at each of
  their positions), `vision_rows` (the rows a vision-stage method hands the LLM, from its stats),
  `sample_embeds` (one sample alone, unpadded, its placeholders shrunk to those rows: the `inputs_embeds`
  the LLM should see, with contiguous positions).
* `internvl_post_shuffle`: InternVL's post-shuffle tensors (projector input, CLS attention and keys pooled
  over 2x2 source patches) for the selection checks.
* LLM stage: `llm_plan` (FastV's / PyramidDrop's schedule, counts and ranking layer), `llm_stage_reference`
  (on the eager model, the last prompt token's attention in layer K-1, or in layer K before the drop, ranks
  each image's tokens; the dropped ones are
  masked out as keys of every layer >= K, positions kept or renumbered), `MaskedLM` (that masking).
* `sample_reference`: both stages for one sample: logits, the next step on the returned cache, greedy
  `generate`.
* open_clip: `manual_tower` (the tower run block by block with a hand-chosen set of rows from block L on),
  `stats_rows` (those rows from the stats), `mha_cls_row_and_keys` (a block's CLS row and keys from
  `nn.MultiheadAttention`'s own weights).
* `model_state`: everything `apply` may touch on an instance, to check that `remove()` restores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def cumsum_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions of a left-padded batch: 0.. along the valid tokens, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


# ------------------------------------------------------------------------------------------ vision stage
@dataclass
class ImageRef:
    """One image of a batch, as the unmodified model sees it."""

    sample: int  # batch row
    rows: torch.Tensor  # (n, D) visual rows the LLM receives (LLaVA-NeXT newline rows included)
    pre: torch.Tensor  # (n, C) the projector's input at each position (zeros on newline rows)
    content: torch.Tensor  # (n,) bool, False on LLaVA-NeXT's newline rows
    crops: int  # crops the model encodes for it (LLaVA-NeXT: base + grid; InternVL: tiles)
    deepstack: list = field(default_factory=list)  # Qwen3-VL: (n, D) DeepStack rows per DeepStack layer


def _placeholder_runs(input_ids: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """(row, length) of each maximal run of `token`, in batch then position order."""
    runs = []
    for b, row in enumerate(input_ids.tolist()):
        n = 0
        for t in row + [None]:
            if t == token:
                n += 1
            elif n:
                runs.append((b, n))
                n = 0
    return runs


def _assign_rows(input_ids: torch.Tensor, token: int, sizes: list[int]) -> list[int]:
    """Batch row of each image (in order), from the rows' placeholder counts."""
    per_row = (input_ids == token).sum(1).tolist()
    samples, i = [], 0
    for b, count in enumerate(per_row):
        while count > 0:
            assert i < len(sizes), f"row {b} holds more placeholders than the images have rows"
            samples.append(b)
            count -= sizes[i]
            i += 1
        assert count == 0, f"row {b}: placeholders do not split into whole images"
    assert i == len(sizes), f"{len(sizes) - i} images have no placeholders"
    return samples


QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")


def _qwen_image_refs(model: nn.Module, inputs: dict) -> list[ImageRef]:
    """Qwen-VL: each image's merger output, and the merger's normalised input (4 patches per LLM token) put
    in LLM-token order by the model's own un-permutation (`argsort(window_index)`)."""
    mm = model.model
    visual = mm.visual
    seen = {}

    def grab(module, args):  # returns None: the input goes on unchanged
        seen.setdefault("pre", args[0].detach())

    hook = visual.merger.register_forward_pre_hook(grab)
    grid = inputs["image_grid_thw"]
    try:
        with torch.no_grad():
            out = mm.get_image_features(inputs["pixel_values"], grid, return_dict=True)
    finally:
        hook.remove()
    merger = visual.merger
    with torch.no_grad():
        if model.config.model_type == "qwen2_5_vl":
            pre = merger.ln_q(seen["pre"]).view(-1, merger.hidden_size)  # (S/4, 4C) window order
            from transformers.vision_utils import get_vision_window_index

            widx, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
            pre = pre[torch.argsort(widx)]  # as the model un-permutes its merger output
        else:
            pre = merger.norm(seen["pre"]).view(-1, merger.hidden_size)  # (S/4, 4C)
    rows = list(out.pooler_output)
    pres = list(torch.split(pre, [r.shape[0] for r in rows]))
    samples = _assign_rows(inputs["input_ids"], model.config.image_token_id, [r.shape[0] for r in rows])
    refs = [ImageRef(s, r, p, torch.ones(r.shape[0], dtype=torch.bool), 1) for s, r, p in zip(samples, rows, pres)]
    for i, ref in enumerate(refs):  # Qwen3-VL: each image's DeepStack rows, one (n, D) per DeepStack layer
        ref.deepstack = [layer[i] for layer in (getattr(out, "deepstack_features", None) or [])]
    return refs


def qwen_project(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The rest of a Qwen merger: (n, 4C) normalised merger input -> (n, D)."""
    m = model.model.visual.merger
    if model.config.model_type == "qwen2_5_vl":
        return m.mlp(rows)
    return m.linear_fc2(m.act_fn(m.linear_fc1(rows)))


def image_refs(model: nn.Module, inputs: dict) -> list[ImageRef]:
    """Every image of `inputs` (batch order, then prompt order), through the model's own `get_image_features`
    and, for the projector's input, a pre-hook on its `multi_modal_projector`."""
    if model.config.model_type in QWEN_TYPES:
        return _qwen_image_refs(model, inputs)
    mm = model.model
    seen = {}

    def grab(module, args):  # returns None: the input goes on unchanged
        seen.setdefault("pre", args[0].detach())

    hook = mm.multi_modal_projector.register_forward_pre_hook(grab)
    kw = {"pixel_values": inputs["pixel_values"]}
    for name in ("image_sizes", "batch_num_images"):
        if name in inputs:
            kw[name] = inputs[name]
    try:
        with torch.no_grad():
            feats = mm.get_image_features(**kw, return_dict=True).pooler_output
    finally:
        hook.remove()
    pre = seen["pre"]  # (crops, tokens per crop, C)
    kind = model.config.model_type
    token = model.config.image_token_id
    if kind == "internvl":  # (tiles, tokens per tile, D); an image is a run of placeholders (between <img> </img>)
        per_tile = feats.shape[1]
        tiles = [n // per_tile for _, n in _placeholder_runs(inputs["input_ids"], token)]
        assert sum(tiles) == feats.shape[0], (tiles, feats.shape)
        starts = [sum(tiles[:i]) for i in range(len(tiles) + 1)]
        rows = [feats[a:b].reshape(-1, feats.shape[-1]) for a, b in zip(starts, starts[1:])]
        pres = [pre[a:b].reshape(-1, pre.shape[-1]) for a, b in zip(starts, starts[1:])]
        contents = [torch.ones(r.shape[0], dtype=torch.bool) for r in rows]
        crops = tiles
    elif kind == "llava_next":  # per image: the model's own packing (unpad + newline rows) of the projector input
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        n_crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                             patch_size=cfg.vision_config.image_size) for s in inputs["image_sizes"]]
        per_image = list(torch.split(pre, n_crops))
        zero = torch.zeros(pre.shape[-1], dtype=pre.dtype)
        with torch.no_grad():
            pres, _ = mm.pack_image_features(per_image, inputs["image_sizes"], "default", image_newline=zero)
            ones = [torch.ones_like(p[..., :1]) for p in per_image]
            marks, _ = mm.pack_image_features(ones, inputs["image_sizes"], "default", image_newline=zero[:1])
        if not isinstance(pres, (list, tuple)):  # one concatenated tensor: split by the packed lengths
            lens = [int(f.shape[0]) for f in feats]
            pres, marks = list(torch.split(pres, lens)), list(torch.split(marks, lens))
        rows = list(feats)
        contents = [m[:, 0] > 0 for m in marks]
        crops = n_crops
    elif kind == "llava_onevision":  # the model's own packing (unpad, bilinear down-sampling, newline rows)
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = model.config
        sizes = inputs["image_sizes"]
        per_sample = inputs.get("batch_num_images")
        patched = ([True] * len(sizes) if per_sample is None
                   else [int(n) == 1 for n in per_sample for _ in range(int(n))])  # multi-image: one crop each
        n_crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                             patch_size=cfg.vision_config.image_size) if p else 1
                   for s, p in zip(sizes, patched)]
        per_image = list(torch.split(pre, n_crops))
        zero = torch.zeros(pre.shape[-1], dtype=pre.dtype)
        with torch.no_grad():
            pres, _ = mm.pack_image_features(per_image, sizes, image_newline=zero,
                                             vision_aspect_ratio=cfg.vision_aspect_ratio)
            ones = [torch.ones_like(p[..., :1]) for p in per_image]
            marks, _ = mm.pack_image_features(ones, sizes, image_newline=zero[:1],
                                              vision_aspect_ratio=cfg.vision_aspect_ratio)
        rows = list(feats)
        contents = [m[:, 0] > 0 for m in marks]
        crops = n_crops
    elif kind == "llava":
        rows, pres = list(feats), list(pre)
        contents = [torch.ones(r.shape[0], dtype=torch.bool) for r in rows]
        crops = [1] * len(rows)
    else:
        raise ValueError(f"model_type={kind!r}: no reference for this family")
    samples = _assign_rows(inputs["input_ids"], token, [r.shape[0] for r in rows])
    for r, p in zip(rows, pres):
        assert r.shape[0] == p.shape[0], (r.shape, p.shape)
    return [ImageRef(s, r, p, c, k) for s, r, p, c, k in zip(samples, rows, pres, contents, crops)]


def merged_row(pre: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """VisionZip's contextual token (official code): the target (first) + the mean of the tokens merged into it."""
    target = pre[group[0]]
    return target + pre[group[1:]].mean(0) if group.numel() > 1 else target


def pooled_row(pre: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """`pool`'s cell: the mean of its region."""
    return pre[group].mean(0)


NEW_ROW: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"visionzip": merged_row, "pool": pooled_row}


def vision_rows(model: nn.Module, image: ImageRef, stat) -> torch.Tensor:
    """(n_kept, D) the rows a vision-stage method hands the LLM for `image`: the unmodified rows at
    `stat.kept_indices`, then its new rows (made from the projector's input, then put through the projector)."""
    rows = image.rows[stat.kept_indices]
    if stat.n_new:
        rule = NEW_ROW[stat.method.split("+")[0]]
        with torch.no_grad():
            made = torch.stack([rule(image.pre, g) for g in stat.new_groups])  # (n_new, C)
            if model.config.model_type in QWEN_TYPES:
                projected = qwen_project(model, made)
            else:
                projected = model.model.multi_modal_projector(made)
            rows = torch.cat([rows, projected.to(rows.dtype)])
    return rows


def qwen_sample_reference(model: nn.Module, inputs: dict, b: int, images: list[ImageRef], stats: list | None,
                          plan: LLMPlan | None = None, *, n_new: int, next_token: int | None = None) -> SampleRef:
    """Qwen-VL, sample b alone and unpadded, by hand on the unmodified model: the M-RoPE positions the model's
    own `get_rope_index` gives the sample's *whole* prompt, kept (and its text) rows only -- each image's rows
    at `stats[i].kept_indices` then its new rows (made by `NEW_ROW` from the merger input, placed at the first
    position each summarises) -- fed to the language model with those positions; for Qwen3-VL the DeepStack
    rows of exactly those rows (new rows: the mean of their group's) with `visual_pos_masks` at them.
    `stats` None: every row.  Then one manual cache step fed `next_token` and a greedy continuation, each
    decode position one past the prompt's largest (the unmodified model's rule); `plan`: the LLM stage by
    masking (eager model)."""
    mm = model.model
    valid = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][valid]
    tt = inputs["mm_token_type_ids"][b][valid]
    mine = [i for i, im in enumerate(images) if im.sample == b]
    grid = inputs["image_grid_thw"][[i for i in mine]] if mine else None
    with torch.no_grad():
        pos, _ = mm.get_rope_index(ids[None], mm_token_type_ids=tt[None], image_grid_thw=grid)  # (3, 1, L)
    ph = (ids == model.config.image_token_id).nonzero(as_tuple=True)[0]
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    src = torch.arange(ids.numel())  # the position each kept token takes
    rows, deep, off = [], [], 0
    for i in mine:
        im, n = images[i], images[i].rows.shape[0]
        st = stats[i] if stats is not None else None
        kept = st.kept_indices if st is not None else torch.arange(n)
        r = vision_rows(model, im, st) if st is not None else im.rows
        reps = torch.stack([g[0] for g in st.new_groups]) if st is not None and st.n_new else kept[:0]
        keep[ph[off:off + n]] = False
        keep[ph[off:off + r.shape[0]]] = True
        src[ph[off:off + r.shape[0]]] = ph[off + torch.cat([kept, reps])]
        rows.append(r)
        layers = getattr(im, "deepstack", [])
        if layers:
            made = [torch.stack([d[g].mean(0) for g in st.new_groups]) if st is not None and st.n_new else d[:0]
                    for d in layers]
            deep.append([torch.cat([d[kept], m]) for d, m in zip(layers, made)])
        off += n
    ids_kept = ids[keep]
    pos = pos[:, :, src[keep]]  # (3, 1, L_b) the kept tokens' own positions
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids_kept)[None].clone()  # (1, L_b, D)
        vis = ids_kept == model.config.image_token_id  # (L_b,)
        if rows:
            emb[0, vis] = torch.cat(rows).to(emb.dtype)
    spans, off = [], 0
    vis_pos = vis.nonzero(as_tuple=True)[0]
    for r in rows:
        spans.append(vis_pos[off:off + r.shape[0]])
        off += r.shape[0]
    extra = {}
    if deep:
        extra = {"visual_pos_masks": vis[None],
                 "deepstack_visual_embeds": [torch.cat([d[j] for d in deep]) for j in range(len(deep[0]))]}
    lm = mm.language_model

    def run(e, p, cache=None, mask=None, **kw):
        out = lm(inputs_embeds=e, position_ids=p, cache=cache, use_cache=True, attention_mask=mask, **kw)
        return model.lm_head(out.last_hidden_state)[0], out.cache

    if plan is not None and spans:
        ctx, kept_llm = llm_stage_reference(model, emb, spans, plan, run=lambda e: run(e, pos, **extra))
        live = ~ctx.dropped[-1]
    else:
        ctx, kept_llm = None, [torch.arange(len(s)) for s in spans]
        live = torch.ones(emb.shape[1], dtype=torch.bool)
    nxt_pos = int(pos.max()) + 1
    L = emb.shape[1]
    with torch.no_grad():
        if ctx is not None:
            ctx.__enter__()
        try:
            logits, cache = run(emb, pos, **extra)
            step = None
            if next_token is not None:
                e = model.get_input_embeddings()(torch.tensor([[next_token]]))
                p = torch.full((3, 1, 1), nxt_pos)
                step = run(e, p, cache=cache, mask=torch.ones(1, L + 1, dtype=torch.long))[0][-1]
            # greedy continuation from a fresh prefill
            logits_g, cache = run(emb, pos, **extra)
            tokens = [int(logits_g[-1].argmax())]
            for t in range(1, n_new):
                e = model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
                p = torch.full((3, 1, 1), nxt_pos + t - 1)
                lg, cache = run(e, p, cache=cache, mask=torch.ones(1, L + t, dtype=torch.long))
                tokens.append(int(lg[-1].argmax()))
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return SampleRef(logits, live, step, tokens, kept_llm)


def sample_embeds(model: nn.Module, inputs: dict, b: int, images: list[ImageRef],
                  rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sample b alone, unpadded: its text with each of its images' placeholders shrunk to `rows[i]`
    (one entry per image of the batch), holding those rows.  Returns (1, L_b, D) `inputs_embeds` and, per
    image of the sample, the positions of its rows."""
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
    mine = [i for i, im in enumerate(images) if im.sample == b]
    ph = (ids == image_id).nonzero(as_tuple=True)[0]
    assert ph.numel() == sum(images[i].rows.shape[0] for i in mine)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    off = 0
    for i in mine:
        n = images[i].rows.shape[0]
        keep[ph[off + rows[i].shape[0]: off + n]] = False
        off += n
    ids = ids[keep]
    pos = (ids == image_id).nonzero(as_tuple=True)[0]
    spans, off = [], 0
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)[None].clone()  # (1, L_b, D)
        for i in mine:
            span = pos[off: off + rows[i].shape[0]]
            emb[0, span] = rows[i].to(emb.dtype)
            spans.append(span)
            off += rows[i].shape[0]
    return emb, spans


def internvl_post_shuffle(model: nn.Module, pixel_values: torch.Tensor):
    """InternVL without vlmdrop, per tile on the post-shuffle raster grid (side s = sqrt(tokens per tile)):
    the projector's input in placeholder order (T, s*s, 4C); the feature layer's CLS attention summed over
    each token's 2x2 source patches (T, H, s*s) (eager attention probabilities; None under sdpa); its keys
    (a hook on k_proj) averaged over heads, then over the 2x2 sources (T, s*s, Dh).  Feature layer -1."""
    assert model.config.vision_feature_layer == -1, model.config.vision_feature_layer
    vt = model.model.vision_tower
    attn = vt.encoder.layer[-1].attention
    seen = {}

    def grab(module, args, out):  # returns None: the output goes on unchanged
        seen["k"] = out.detach()

    hook = attn.k_proj.register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = vt(pixel_values=pixel_values, output_attentions=True)
    finally:
        hook.remove()
    t = pixel_values.shape[0]
    feats = out.last_hidden_state[:, 1:]  # (T, P*P, C) patches, CLS dropped
    n_patch = feats.shape[1]
    side_p = math.isqrt(n_patch)  # patches per side
    side, per_tile = side_p // 2, n_patch // 4  # post-shuffle grid
    with torch.no_grad():
        pre = model.model.pixel_shuffle(feats.reshape(t, side_p, side_p, -1), scale_factor=0.5)
    pre = pre.reshape(t, per_tile, -1)  # (T, s*s, 4C) what the projector receives, in placeholder order
    heads = attn.num_heads
    cls = None  # attention probabilities come back under eager attention only
    if out.attentions:
        cls = out.attentions[-1][:, :, 0, 1:]  # (T, H, P*P) CLS row, CLS column dropped
        cls = cls.reshape(t, heads, side, 2, side, 2).sum((3, 5)).reshape(t, heads, per_tile)  # (T, H, s*s)
    k = seen["k"][:, 1:]  # (T, P*P, H*Dh)
    k = k.reshape(t, n_patch, heads, -1).mean(2)  # (T, P*P, Dh)
    k = k.reshape(t, side, 2, side, 2, -1).mean((2, 4)).reshape(t, per_tile, -1)  # (T, s*s, Dh)
    return pre, cls, k


# --------------------------------------------------------------------------------------------- LLM stage
@dataclass(frozen=True)
class LLMPlan:
    """An LLM-stage method's schedule: drop layers, tokens kept at each stage, positions rule."""

    layers: tuple[int, ...]
    keep: Callable[[int, int, int], int]  # (stage, image tokens entering the LLM, still present) -> kept
    positions: str = "original"
    score: str = "previous"  # the drop at K is ranked by layer K-1 ("previous") or by layer K itself ("current")


def llm_plan(method: str, params: dict) -> LLMPlan:
    """The documented rules: FastV keeps round(keep * n) (at least 1) or min(keep, n) from `layer` on, ranked
    by layer K-1's attention; PyramidDrop keeps round(n * r_0 * ... * r_s) after boundary s, ranked by layer
    K's own attention on its input before the drop (`score_layer="current"`, the official rule) or by
    layer K-1's (`score_layer="previous"`)."""
    positions = params.get("positions", "original")
    if method == "fastv":
        keep = params.get("keep", 0.5)

        def fastv(stage: int, n: int, present: int) -> int:
            return min(present, max(1, round(keep * present))) if isinstance(keep, float) else min(keep, present)
        return LLMPlan((params.get("layer", 2),), fastv, positions)
    if method == "pdrop":
        layers = tuple(params.get("layers", (8, 16, 24)))
        ratio = params.get("ratio", 0.5)
        ratios = tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,) * len(layers)

        def pdrop(stage: int, n: int, present: int) -> int:
            return min(present, max(1, round(n * math.prod(ratios[: stage + 1]))))
        return LLMPlan(layers, pdrop, positions, params.get("score_layer", "current"))
    raise ValueError(f"method={method!r} is no LLM-stage method")


def _causal_mask(q: int, kv: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, q, kv) additive causal mask for one unpadded sample whose last q tokens are the queries."""
    allowed = torch.arange(kv)[None, :] <= torch.arange(kv - q, kv)[:, None]
    return torch.zeros(q, kv, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class MaskedLM:
    """On the unmodified model (one sample): the positions dropped by stage s are masked out as keys of
    every decoder layer >= K_s; with positions="compact", layers >= K_s renumber the tokens that remain."""

    def __init__(self, model: nn.Module, plan: LLMPlan) -> None:
        self.lm = model.model.language_model
        self.plan = plan
        self.dropped: list[torch.Tensor] = []  # per finished stage: (L,) bool, cumulative
        self.handles: list = []

    def __enter__(self) -> MaskedLM:
        for i in range(self.plan.layers[0], len(self.lm.layers)):
            self.handles.append(self.lm.layers[i].register_forward_pre_hook(self._pre(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            stages = [s for s, k in enumerate(self.plan.layers[: len(self.dropped)]) if k <= i]
            if not stages:
                return None
            d = self.dropped[stages[-1]]  # (L,) True where dropped
            length = d.shape[0]
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            q = hidden.shape[1]
            mask = kwargs.get("attention_mask")
            if mask is None:
                kv = q if q == length else length + q  # prefill, or one cache step after it
                mask = _causal_mask(q, kv, hidden.dtype)
            assert mask.dtype.is_floating_point, "the masking reference needs an additive (eager) mask"
            mask = mask.clone()  # (1, 1, q, kv)
            mask[..., :length] = mask[..., :length].masked_fill(d, torch.finfo(mask.dtype).min)
            kwargs = dict(kwargs, attention_mask=mask)
            if self.plan.positions == "compact":
                pos = kwargs["position_ids"]  # (1, q)
                if q == length:  # prefill: each token moves back by the dropped ones before it
                    pos = pos - (d.long().cumsum(0) - d.long())[None]
                else:
                    pos = pos - d.long().sum()
                kwargs["position_ids"] = pos
                kwargs["position_embeddings"] = self.lm.rotary_emb(hidden, pos)
            return args, kwargs

        return hook


def llm_stage_reference(model: nn.Module, emb: torch.Tensor, spans: list[torch.Tensor],
                        plan: LLMPlan, *, run: Callable | None = None) -> tuple[MaskedLM, list[torch.Tensor]]:
    """Stage by stage on the eager `model` (one sample, `emb` (1, L, D)): the last token's attention
    probabilities (mean over heads) in layer K-1, or in layer K itself while only the earlier stages' drops
    are masked (`plan.score == "current"`: layer K on its input before the drop), rank each image's present
    tokens; its top `plan.keep` stay.
    Returns the masking (a context manager) and, per image, the indices into its span that survive."""
    present = [torch.arange(len(s)) for s in spans]
    ref = MaskedLM(model, plan)
    for stage, k in enumerate(plan.layers):
        seen = {}

        def grab(module, args, out):  # returns None: the output goes on unchanged
            seen.setdefault("w", out[1])

        scorer = k - 1 if plan.score == "previous" else k
        hook = model.model.language_model.layers[scorer].self_attn.register_forward_hook(grab)
        try:
            with torch.no_grad(), ref:
                run(emb) if run is not None else model(inputs_embeds=emb)
        finally:
            hook.remove()
        assert seen["w"] is not None, "the masking reference needs attention weights (an eager model)"
        row = seen["w"][0, :, -1, :].float().mean(0)  # (L,) last prompt token, mean over heads
        d = ref.dropped[-1].clone() if ref.dropped else torch.zeros(emb.shape[1], dtype=torch.bool)
        for i, span in enumerate(spans):
            p = span[present[i]]
            n_keep = plan.keep(stage, len(span), len(p))
            order = torch.sort(row[p], descending=True, stable=True).indices
            kept = order[:n_keep].sort().values
            gone = torch.ones(len(p), dtype=torch.bool)
            gone[kept] = False
            d[p[gone]] = True
            present[i] = present[i][kept]
        ref.dropped.append(d)
    return ref, present


@dataclass
class SampleRef:
    """The reference run of one sample."""

    logits: torch.Tensor  # (L_b, V) prefill logits
    live: torch.Tensor  # (L_b,) bool: positions whose logits mean something (not dropped by an LLM stage)
    step_logits: torch.Tensor | None  # (V,) one cache step after the prefill, fed `next_token`
    tokens: list[int]  # greedy continuation
    kept: list[torch.Tensor] = field(default_factory=list)  # per image: surviving indices into its rows


def sample_reference(model: nn.Module, emb: torch.Tensor, spans: list[torch.Tensor], plan: LLMPlan | None, *,
                     n_new: int, next_token: int | None = None) -> SampleRef:
    """Prefill, one manual cache step fed `next_token`, and greedy `generate` of `n_new` tokens for one sample
    (`emb` from `sample_embeds`), with the LLM stage `plan` applied by masking (needs the eager model)."""
    if plan is not None and spans:
        ctx, kept = llm_stage_reference(model, emb, spans, plan)
        live = ~ctx.dropped[-1]
    else:
        ctx, kept = None, [torch.arange(len(s)) for s in spans]
        live = torch.ones(emb.shape[1], dtype=torch.bool)
    L = emb.shape[1]
    with torch.no_grad():
        if ctx is not None:
            ctx.__enter__()
        try:
            out = model(inputs_embeds=emb, use_cache=True)
            step = None
            if next_token is not None:
                nxt = model.get_input_embeddings()(torch.tensor([[next_token]]))
                step = model(inputs_embeds=nxt, cache=out.cache, position_ids=torch.tensor([[L]]),
                             attention_mask=torch.ones(1, L + 1, dtype=torch.long)).logits[0, -1]
            gen = model.generate(inputs_embeds=emb, attention_mask=torch.ones(1, L, dtype=torch.long),
                                 max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return SampleRef(out.logits[0], live, step, gen[0, -n_new:].tolist(), kept)


# ---------------------------------------------------------------------------------------------- open_clip
def manual_tower(visual: nn.Module, x: torch.Tensor, layer: int,
                 choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip `VisionTransformer` run block by block; block `layer` (and every later one) gets
    `choose(h, before)` instead of h, the (B, 1 + N, C) output of block layer-1 (`before`: that block's
    input).  Returns (projected pooled embedding, tokens) as `encode_image` computes them."""
    blocks = visual.transformer.resblocks
    h = visual._embeds(x)  # (B, 1 + N, C)
    before = h
    for i, blk in enumerate(blocks):
        if i == layer:
            h = choose(h, before)
        before = h
        h = blk(h)
    pooled, tokens = visual._pool(h)
    return pooled @ visual.proj, tokens


def stats_rows(stats) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `manual_tower` choice driven by the stats: per image CLS, the patches at `kept_indices`, then the
    new rows (VisionZip: target + mean of its group; pool: the group's mean) made from block layer-1's output."""
    def choose(h: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        rows = []
        for b, s in enumerate(stats.images):
            parts = [h[b, :1], h[b, 1 + s.kept_indices]]
            if s.n_new:
                rule = NEW_ROW[s.method]
                parts.append(torch.stack([rule(h[b, 1:], g) for g in s.new_groups]))
            rows.append(torch.cat(parts))
        return torch.stack(rows)  # (B, 1 + n_keep, C)

    return choose


def mha_cls_row_and_keys(block: nn.Module, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `block` (an open_clip ResidualAttentionBlock with `nn.MultiheadAttention`) on its input `before`:
    (B, H, N) the CLS row of its attention probabilities (CLS column dropped) and (B, H, N, Dh) its keys."""
    inp = block.ln_1(before)
    _, w = block.attn(inp, inp, inp, need_weights=True, average_attn_weights=False)  # (B, H, T, T)
    c = inp.shape[-1]
    k = nn.functional.linear(inp, block.attn.in_proj_weight[c:2 * c], block.attn.in_proj_bias[c:2 * c])
    keys = k.view(k.shape[0], k.shape[1], block.attn.num_heads, -1).transpose(1, 2)[:, :, 1:]  # (B, H, N, Dh)
    return w[:, :, 0, 1:], keys


# ------------------------------------------------------------------------------------------ model state
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def model_state(model: nn.Module) -> dict:
    """Everything `apply` may touch: per module its class, its hooks of every kind (their ids) and the
    names in its `__dict__`; the attributes of every class involved; the attention implementations of its
    configs; torch's global module hooks."""
    from torch.nn.modules import module as torch_module

    modules, classes = {}, {}
    for name, m in model.named_modules():
        hooks = tuple(tuple(getattr(m, a, {})) for a in _HOOK_DICTS)
        modules[name] = (type(m), hooks, tuple(sorted(m.__dict__)), tuple(sorted(m._parameters)),
                         tuple(sorted(m._buffers)))
        for cls in type(m).__mro__:
            if cls not in classes and cls is not object:
                classes[cls] = tuple(sorted((k, id(v)) for k, v in vars(cls).items()))
    attn = {}
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for sub in [cfg] + [getattr(cfg, k) for k in ("vision_config", "text_config") if hasattr(cfg, k)]:
            attn[type(sub).__name__] = getattr(sub, "_attn_implementation", None)
    glob = tuple(tuple(getattr(torch_module, g, {})) for g in _GLOBAL_HOOKS)
    return {"modules": modules, "classes": classes, "attn": attn, "global_hooks": glob}
