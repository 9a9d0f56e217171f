"""LLM prefill-stage dropping (FastV, PyramidDrop) with decoder-layer hooks.

What the engine needs from a model, and nothing more: the language model module (a Llama-style
decoder stack called with a 2-D `attention_mask`), its decoder layers, its rotary embedding, its
text config, and — per prefill, from the adapter — where each image's tokens sit in the sequence
(`ImageSpan`, which the prefill hook, `adapters/prefill.py`, puts in the running `Call.spans`).
Everything one forward computes lives in that call (`Call.llm`, an `LLMForward`), never on the
engine; what decode steps need goes in the call's `CacheState.llm`, keyed to the cache at the end.

Per drop layer K (one for FastV, one per stage boundary for PyramidDrop), the scores are the last
prompt token's attention row, mean over heads (`vlmdrop.ops.llm_scores`), the same under eager,
sdpa and flash attention, taken by the method's `score_layer` rule:

* "previous" (FastV; `pdrop(score_layer="previous")`) — forward hooks on `q_proj` / `k_proj` of layer
  K−1's attention and a pre-hook on that attention (for the `position_embeddings` it received): the
  attention layer K−1 really computed, at no extra cost.
* "current" (PyramidDrop's official rule, its default) — the pre-hook on layer K, before the drop,
  applies layer K's own `input_layernorm`, `k_proj` (every row) and `q_proj` (the query rows only)
  to layer K's full input, with the positions layers < K used; then layer K runs on the reduced
  sequence, as in the official code.

Then:

* drop — a pre-hook on decoder layer K gathers the kept rows of `hidden_states`, re-pads rows of
  unequal length on the left, and hands layers ≥ K their own `attention_mask` (built by the
  installed transformers' `create_causal_mask`, sized against layer K's cache), `position_ids` and
  `position_embeddings` ("original": the kept tokens' own positions; "compact": renumbered).
* output — a forward hook on the last decoder layer scatters the surviving rows back into the
  full-length sequence, so logits keep the length of the sequence the language model received;
  a dropped position carries the hidden state it had when it was dropped (meaningless logits there).
* decode — the cache of layers ≥ K simply holds fewer rows; at every later step on that cache the
  pre-hooks give layers ≥ K a mask (and, for "compact", positions) that match their own cache.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmdrop.interface import LLMMethod
from vlmdrop.ops.compact import compact_positions, gather_rows, last_index, recompact, scatter_back
from vlmdrop.ops.llm_scores import last_token_attention
from vlmdrop.stats import ImageStats

from .state import CallScope, ImageSpan

logger = logging.getLogger("vlmdrop")


@dataclass
class _Stage:
    """The sequence layers ≥ `layer` see after a drop (all indices in the prefill's coordinates)."""

    layer: int
    src: torch.Tensor  # (B, L_s) prefill position held by each slot
    valid: torch.Tensor  # (B, L_s) False for slots of new left padding
    prefix_mask: torch.Tensor  # (B, L_s) bool 2-D mask of the slots
    removed: torch.Tensor  # (B,) positions removed from each row so far
    where: torch.Tensor  # (B, L) slot of each prefill position, -1 when dropped
    positions: torch.Tensor | None = None  # (B, L_s) prefill positions of the slots ("compact": renumbered)
    emb: tuple[torch.Tensor, torch.Tensor] | None = None  # "original": (cos, sin) (B, L_s, D) the slots received


@dataclass
class LLMDecode:
    """What decode steps on a cache need from the prefill that filled it."""

    orig_len: int
    stages: list[_Stage]


@dataclass
class _Image:
    span: ImageSpan
    present: torch.Tensor  # (n_present,) indices into the span that are still in the sequence
    layer_tokens: list[int] = field(default_factory=list)


@dataclass
class LLMForward:
    """State of one language-model forward."""

    mode: str  # "prefill" or "decode"
    cache: Any
    mask2d: torch.Tensor | None  # prefill: (B, L) bool; decode: the caller's (B, L + t) mask or None
    length: int = 0  # prefill L
    images: list[_Image] = field(default_factory=list)
    stages: list[_Stage] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # drop layer -> (B, L_prev) scores
    pos_emb: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_kwargs: dict[int, tuple[Any, Any, Any]] = field(default_factory=dict)  # stage -> (mask, pos, emb)
    full: torch.Tensor | None = None  # (B, L, D) re-expansion buffer
    deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (visual_pos_masks (B, L), rows per layer)


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


class LLMStageEngine:
    """Runs one LLM-stage method on a decoder stack.

    Args:
        language_model: the decoder stack (called with `attention_mask`, `cache`, `inputs_embeds`).
        layers: its decoder layers, in order; each has `self_attn` with `q_proj`, `k_proj`, `scaling`
            (and `input_layernorm` for the "current" score rule).
        rotary_emb: the module mapping `(x, position_ids)` to `(cos, sin)`.
        config: the text config (`num_attention_heads`, `num_key_value_heads`, `_attn_implementation`).
        method: the `LLMMethod`.
        scope: the top-level model's `CallScope`; each prefill's per-image stats go to its `Call.stats`.
    """

    def __init__(self, *, language_model: nn.Module, layers: list[nn.Module], rotary_emb: nn.Module, config: Any,
                 method: LLMMethod, scope: CallScope) -> None:
        self.lm, self.layers, self.rotary_emb, self.config = language_model, list(layers), rotary_emb, config
        self.method, self.scope = method, scope
        self.num_layers = len(self.layers)
        self.drop_layers = method.drop_layers(self.num_layers)
        self.score_rule = method.score_layer
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        # Qwen3-VL: the language model adds DeepStack rows after its first layers at `visual_pos_masks`
        self.takes_deepstack = "deepstack_visual_embeds" in inspect.signature(language_model.forward).parameters
        self._handles: list[Any] = []
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------ installation
    def _install(self) -> None:
        types = list(getattr(self.config, "layer_types", None) or [])
        other = {i: t for i, t in enumerate(types) if i >= self.drop_layers[0] and t != "full_attention"}
        if other:
            raise ValueError(f"decoder layers {sorted(other)} use {sorted(set(other.values()))}; vlmdrop LLM-stage "
                             "methods rebuild the mask of layers >= the first drop layer as full (causal) attention")
        h = self._handles
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True))
        for k in self.drop_layers:
            j = k - 1 if self.score_rule == "previous" else k  # the layer whose q/k score the drop at k
            attn = getattr(self.layers[j], "self_attn", None)
            needs = ["self_attn.q_proj", "self_attn.k_proj"] + (["input_layernorm"] if j == k else [])
            for name in needs:
                owner = self.layers[j] if name == "input_layernorm" else attn
                if not isinstance(getattr(owner, name.split(".")[-1], None), nn.Module):
                    raise ValueError(f"decoder layer {j} ({type(self.layers[j]).__name__}) has no {name}; vlmdrop "
                                     f"scores LLM layers from their q_proj/k_proj (score_layer={self.score_rule!r})")
            if j == k:
                continue  # scored in layer k's pre-hook
            h.append(attn.register_forward_pre_hook(self._attn_pre(k), with_kwargs=True))
            h.append(attn.q_proj.register_forward_hook(self._q_hook(k)))
            h.append(attn.k_proj.register_forward_hook(self._k_hook(k, attn)))
        for i in range(self.drop_layers[0], self.num_layers):
            h.append(self.layers[i].register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
        if self.takes_deepstack:  # registered first: a layer's DeepStack rows join before the re-expansion
            for i, layer in enumerate(self.layers):
                h.append(layer.register_forward_hook(self._deepstack_post(i)))
        h.append(self.layers[-1].register_forward_hook(self._last_post))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fwd(self) -> LLMForward | None:
        """The calling thread's running language-model forward, or None."""
        call = self.scope.current
        return call.llm if call is not None else None

    # ------------------------------------------------------- language model
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.scope.current
        if call is None:
            return None  # the language model run on its own, not through the patched model: nothing to do
        spans, call.spans, call.llm = call.spans, None, None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"vlmdrop LLM-stage methods need a 2-D attention_mask, got shape {tuple(mask.shape)}")
        if spans is not None and any(s.positions.numel() for s in spans):
            b, length = x.shape[0], x.shape[1]
            mask2d = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool, device=x.device)
            call.llm = self._start_prefill(spans, mask2d, cache)
            if self.takes_deepstack and kwargs.get("deepstack_visual_embeds") is not None:
                # the engine adds them itself (`_deepstack_post`), at the slots the visual tokens still hold
                kwargs = dict(kwargs)
                rows = list(kwargs.pop("deepstack_visual_embeds"))
                vis = kwargs.pop("visual_pos_masks")
                if vis is None or vis.shape != mask2d.shape:
                    raise ValueError(f"visual_pos_masks {None if vis is None else tuple(vis.shape)} does not match "
                                     f"the sequence {tuple(mask2d.shape)}")
                call.llm.deepstack = (vis.bool(), rows)
                return args, kwargs
            return None
        state = call.cache.llm if call.cache is not None else None
        if state is not None:
            call.llm = LLMForward(mode="decode", cache=cache, mask2d=mask, stages=state.stages, length=state.orig_len)
        return None

    def _start_prefill(self, spans: list[ImageSpan], mask2d: torch.Tensor, cache: Any) -> LLMForward:
        b, length = mask2d.shape
        last = last_index(mask2d)  # (B,)
        images = []
        for span in spans:
            pos = span.positions.to(mask2d.device)
            if pos.numel() and bool((pos == last[span.sample]).any()):
                raise ValueError(f"sample {span.sample}: the last prompt token (position {int(last[span.sample])}) is "
                                 "an image token; LLM-stage methods rank image tokens by the last prompt token's "
                                 "attention, so the prompt must end with text")
            images.append(_Image(span=span, present=torch.arange(pos.numel(), device=mask2d.device)))
        return LLMForward(mode="prefill", cache=cache, mask2d=mask2d, length=length, images=images)

    def _lm_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self.scope.current
        fwd = call.llm if call is not None else None
        if call is not None:
            call.llm = None
        if fwd is None or fwd.mode != "prefill":
            return
        stats = []
        for im in fwd.images:
            while len(im.layer_tokens) < self.num_layers:
                im.layer_tokens.append(int(im.present.numel()))
            st = im.span.base
            # the image's rows are the vision stage's kept positions, then its new (merged / pooled) rows
            present = im.present.to(st.kept_indices.device)  # (n,) surviving rows, ascending
            n_orig = int(st.kept_indices.numel())
            kept = st.kept_indices[present[present < n_orig]]
            new = (present[present >= n_orig] - n_orig).tolist()
            groups = [st.new_groups[i] for i in new] if st.new_groups is not None else None
            name = f"{st.method}+{self.method.config.name}" if st.method else self.method.config.name
            stats.append(ImageStats(sample=st.sample, n_before=st.n_before, n_kept=int(present.numel()),
                                    kept_indices=kept, crop_budgets=list(st.crop_budgets),
                                    crop_kept=list(st.crop_kept), method=name, layer_tokens=list(im.layer_tokens),
                                    n_new=len(new), new_groups=groups))
        call.stats = stats
        if fwd.stages and call.cache is not None:
            call.cache.llm = LLMDecode(orig_len=fwd.length, stages=fwd.stages)

    # --------------------------------------------------------------- scoring
    def _attn_pre(self, k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            fwd = self._fwd()
            if fwd is not None and fwd.mode == "prefill":
                emb = kwargs.get("position_embeddings")
                if emb is None:
                    raise ValueError(f"decoder layer {k - 1}'s attention received no position_embeddings; "
                                     "vlmdrop supports RoPE decoders that pass (cos, sin) to every layer")
                fwd.pos_emb[k] = emb

        return hook

    def _q_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            fwd = self._fwd()
            if fwd is not None and fwd.mode == "prefill":
                fwd.q[k] = out.detach()  # (B, L_prev, H*D)

        return hook

    def _k_hook(self, k: int, attn: nn.Module):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            fwd = self._fwd()
            if fwd is None or fwd.mode != "prefill" or k not in fwd.q:
                return
            q = fwd.q.pop(k)
            cos, sin = fwd.pos_emb.pop(k)
            fwd.scores[k] = self._scores(fwd, attn, q, out.detach(), cos, sin)  # (B, L_prev)

        return hook

    def _scores(self, fwd: LLMForward, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """(B, L_prev) the last prompt token's attention over the sequence layers < K see, from an
        attention module's queries (B, L_prev, H*D) or query rows (B, H*D) and keys (B, L_prev, Hkv*D)."""
        key_mask = fwd.stages[-1].prefix_mask if fwd.stages else fwd.mask2d  # (B, L_prev)
        key_mask = key_mask.to(k.device)
        last = last_index(key_mask)  # (B,)
        causal = torch.arange(key_mask.shape[1], device=key_mask.device)[None] <= last[:, None]  # (B, L_prev)
        return last_token_attention(
            q, k, cos=cos, sin=sin, query_index=last, key_mask=key_mask & causal,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, scale=float(attn.scaling),
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))

    def _score_current(self, fwd: LLMForward, k: int, args: tuple, kwargs: dict) -> None:
        """PyramidDrop's official rule: layer k's own q/k on its (not yet reduced) input."""
        layer = self.layers[k]
        attn = layer.self_attn
        hidden = _hidden_from(args, kwargs)  # (B, L_prev, D)
        prev = self._stage_of(fwd, k - 1)
        if prev >= 0:  # the positions layers < k ran with (their stage's)
            emb = fwd.layer_kwargs[prev][2]
        else:
            emb = kwargs.get("position_embeddings")
        if emb is None:
            raise ValueError(f"decoder layer {k} received no position_embeddings; vlmdrop supports RoPE "
                             "decoders that pass (cos, sin) to every layer")
        key_mask = fwd.stages[-1].prefix_mask if fwd.stages else fwd.mask2d  # (B, L_prev)
        last = last_index(key_mask).to(hidden.device)  # (B,)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        normed = layer.input_layernorm(hidden)  # (B, L_prev, D)
        keys = attn.k_proj(normed).detach()  # (B, L_prev, Hkv*Dh)
        query = attn.q_proj(normed[rows, last]).detach()  # (B, H*Dh): only the query rows
        cos, sin = emb
        fwd.scores[k] = self._scores(fwd, attn, query, keys, cos, sin)  # (B, L_prev)

    # ------------------------------------------------------------ the drops
    def _layer_pre(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            fwd = self._fwd()
            if fwd is None:
                return None
            if fwd.mode == "prefill" and i in self.drop_layers:
                if self.score_rule == "current":
                    self._score_current(fwd, i, args, kwargs)
                args, kwargs = self._drop(fwd, i, args, kwargs)
            stage = self._stage_of(fwd, i)
            if stage < 0:
                return args, kwargs
            if stage not in fwd.layer_kwargs:
                fwd.layer_kwargs[stage] = self._stage_kwargs(fwd, fwd.stages[stage], _hidden_from(args, kwargs), kwargs)
            mask, pos, emb = fwd.layer_kwargs[stage]
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = mask
            if emb is not None:
                kwargs["position_ids"] = pos
                kwargs["position_embeddings"] = emb
            return args, kwargs

        return hook

    @staticmethod
    def _stage_of(fwd: LLMForward, i: int) -> int:
        s = -1
        for j, st in enumerate(fwd.stages):
            if st.layer <= i:
                s = j
        return s

    def _drop(self, fwd: LLMForward, k: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Remove the image tokens the method drops at layer k from `hidden_states`."""
        hidden = _hidden_from(args, kwargs)  # (B, L_prev, D)
        scores = fwd.scores.pop(k, None)
        stage_idx = self.drop_layers.index(k)
        prev = fwd.stages[-1] if fwd.stages else None
        b, length = fwd.mask2d.shape
        device = hidden.device  # layers may sit on different devices (device_map): work on this layer's
        if prev is not None:
            alive = prev.where.to(device) >= 0
        else:
            alive = torch.ones(b, length, dtype=torch.bool, device=device)
        alive = alive.clone()  # (B, L) prefill positions still in the sequence
        if scores is None:
            raise AssertionError(f"no scores were captured for the drop at layer {k} (score_layer={self.score_rule!r})")
        if prev is not None:
            where_prev = prev.where.to(device)  # (B, L)
        else:
            where_prev = torch.arange(length, device=device).expand(b, length)  # (B, L)
        todo = []  # (image, n_keep) of the images that lose tokens here
        for im in fwd.images:
            im.layer_tokens.extend([int(im.present.numel())] * (k - len(im.layer_tokens)))
            n_present = int(im.present.numel())
            if n_present == 0:
                continue
            n_keep = self.method.n_keep(stage_idx, int(im.span.positions.numel()), n_present)
            if n_keep < n_present:
                todo.append((im, n_keep))
        if not todo:
            return args, kwargs
        # One segmented top-k over every image that loses tokens (each image one segment).
        lengths = [int(im.present.numel()) for im, _ in todo]
        pos = torch.cat([im.span.positions.to(device)[im.present.to(device)] for im, _ in todo])  # (P,) prefill pos
        row = torch.repeat_interleave(torch.tensor([im.span.sample for im, _ in todo], device=device),
                                      torch.tensor(lengths, device=device))  # (P,) batch row of each
        s = scores.to(device)[row, where_prev[row, pos]]  # (P,) scores of the present tokens
        chosen = self.method.select(s, torch.tensor(lengths, device=device),
                                    torch.tensor([n for _, n in todo], device=device))  # (sum n_keep,)
        kept = torch.zeros(pos.numel(), dtype=torch.bool, device=device)  # (P,)
        kept[chosen.to(device)] = True
        alive[row[~kept], pos[~kept]] = False
        for (im, _), keep in zip(todo, torch.split(kept, lengths)):
            im.present = im.present[keep.to(im.present.device)]
        # Keep every row as it was when dropped, for the final re-expansion to full length.
        if prev is None:
            fwd.full = hidden  # (B, L, D)
        else:
            fwd.full = scatter_back(fwd.full, prev.src, prev.valid, hidden)
        new = recompact(hidden, alive, where_prev=where_prev, mask=fwd.mask2d.to(device))
        plan = new.plan
        stage = _Stage(layer=k, src=plan.src, valid=plan.valid, prefix_mask=new.mask, removed=plan.removed,
                       where=new.where)
        pos_ids = kwargs.get("position_ids")
        if self.method.positions == "compact":
            if pos_ids is None:
                pos_ids = torch.arange(length, device=device)[None]
            stage.positions = compact_positions(pos_ids, plan).to(device)  # (B, L_s)
        else:
            # every kept token keeps the rotary embedding it received (whatever the RoPE: 1-D, M-RoPE, ...)
            emb = kwargs.get("position_embeddings")
            if emb is None:
                raise ValueError(f"decoder layer {k} received no position_embeddings; vlmdrop supports RoPE "
                                 "decoders that pass (cos, sin) to every layer")
            stage.emb = tuple(_gather_slots(e, plan.src, b) for e in emb)  # (B, L_s, D) each
            if pos_ids is not None:  # the positions the layers receive besides (masks, flash attention)
                stage.positions = gather_rows(pos_ids.expand(b, -1), plan, fill=0)  # (B, L_s)
        fwd.stages.append(stage)
        return _with_hidden(args, kwargs, new.rows)

    def _stage_kwargs(self, fwd: LLMForward, stage: _Stage, hidden: torch.Tensor, kwargs: dict) -> tuple[Any, Any, Any]:
        """(attention_mask, position_ids, position_embeddings) for the layers of `stage`; embeddings None
        when the layers keep the positions they receive."""
        from transformers.masking_utils import create_causal_mask

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        emb = None
        if fwd.mode == "prefill":
            mask2d = stage.prefix_mask
            pos = stage.positions
            emb = stage.emb
        else:
            q_len = hidden.shape[1]
            past = int(cache.get_seq_length(stage.layer)) if cache is not None else 0
            tail = past - stage.prefix_mask.shape[1] + q_len
            caller = fwd.mask2d
            if caller is None:
                tail_mask = torch.ones(hidden.shape[0], tail, dtype=torch.bool, device=hidden.device)
            else:
                if caller.shape[1] != fwd.length + tail:
                    raise ValueError(f"attention_mask has shape {tuple(caller.shape)} but this decode step expects "
                                     f"(batch, {fwd.length + tail}) = prefill length {fwd.length} + {tail} new tokens")
                tail_mask = caller[:, fwd.length:].bool()
            mask2d = torch.cat([stage.prefix_mask, tail_mask.to(stage.prefix_mask.device)], dim=1)
            pos = None
            if self.method.positions == "compact":
                pos_ids = kwargs["position_ids"]  # (B or 1, q) the caller's positions
                pos = pos_ids - stage.removed.to(pos_ids.device)[:, None]  # (B, q)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache,
                                  position_ids=pos, layer_idx=stage.layer)
        if emb is None and pos is not None and self.method.positions == "compact":
            emb = self.rotary_emb(hidden, pos)
        return mask, pos, emb

    # -------------------------------------------------------------- DeepStack
    def _deepstack_post(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            fwd = self._fwd()
            if fwd is None or fwd.mode != "prefill" or fwd.deepstack is None or i >= len(fwd.deepstack[1]):
                return None
            vis, rows = fwd.deepstack  # (B, L) visual positions; rows[i]: (n_visual, D) in their order
            hidden = output[0] if isinstance(output, tuple) else output  # (B, L_s, D)
            stage = self._stage_of(fwd, i)
            hidden = hidden.clone()
            add = rows[i].to(hidden.device, hidden.dtype)  # (n_visual, D)
            vis = vis.to(hidden.device)
            if stage < 0:  # nothing dropped yet: the language model's own `_deepstack_process`
                hidden[vis, :] = hidden[vis, :] + add
            else:  # only the visual tokens still present, at the slots they now hold
                where = fwd.stages[stage].where.to(hidden.device)  # (B, L)
                order = torch.cumsum(vis.flatten().long(), 0).reshape(vis.shape) - 1  # (B, L) row of each
                alive = vis & (where >= 0)  # (B, L)
                bb, pp = alive.nonzero(as_tuple=True)
                slots = where[bb, pp]
                hidden[bb, slots, :] = hidden[bb, slots, :] + add[order[bb, pp]]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # ---------------------------------------------------------------- output
    def _last_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        fwd = self._fwd()
        if fwd is None or fwd.mode != "prefill" or not fwd.stages:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # (B, L_s, D)
        full = scatter_back(fwd.full, fwd.stages[-1].src, fwd.stages[-1].valid, hidden)  # (B, L, D)
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _gather_slots(x: torch.Tensor, src: torch.Tensor, b: int) -> torch.Tensor:
    """(B or 1, L, D) -> (B, L_s, D): the rows `src` (B, L_s) names (padding slots copy row `src`=0's)."""
    src = src.to(x.device)
    return x.expand(b, -1, -1).gather(1, src[..., None].expand(-1, -1, x.shape[-1]))
