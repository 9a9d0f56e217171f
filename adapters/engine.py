"""Vision-stage dropping inside `forward` / `generate` with one pre-hook and one post-hook, and the
per-call state every stage of a patched model shares (`Call`, `CallScope`).

At prefill (a forward that carries images) the pre-hook takes the visual rows the model is about to
scatter into the placeholders, asks the method which rows to keep, and compacts everything that has
the sequence length — `input_ids` (placeholders), `attention_mask`, `position_ids`, `labels` —
re-padding the batch on the left.  At each later decode step on the same cache it rewrites the
caller's full-length mask and positions to match the shorter cache.  No class of transformers is
touched.

State: what one forward computes lives in a `Call`, created by `CallScope`'s first pre-hook for that
forward in the calling thread and dropped by its always-called forward hook (also when the forward
raises), so a failed call leaves nothing behind and two threads' calls never share anything.  What a
decode step needs from its prefill hangs off the cache object (`_PrefillState`, a weak-key map).
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmdrop.interface import VisionMethod
from vlmdrop.ops.budget import resolve_budget
from vlmdrop.ops.compact import compact_positions, extend_mask, gather_rows, plan_compaction
from vlmdrop.stats import DropStats, ImageStats

logger = logging.getLogger("vlmdrop")


@dataclass
class _PrefillState:
    orig_len: int  # L: the caller's prefill length
    new_len: int  # L': the compacted prefill length
    prefix_mask: torch.Tensor  # (B, L') mask of the compacted prefill
    removed: torch.Tensor  # (B,) positions removed per row
    mask_needed: bool  # the compaction introduced padding, so a mask must always be passed


@dataclass
class Call:
    """What one top-level forward of the patched model computes; never shared between calls.

    Attributes:
        pre_encoded: the caller passed the images already encoded (`mm_encoder_outputs`, as `generate`
            does) rather than `pixel_values`.
        use_cache: the caller's `use_cache` argument (None when not given).
        prefill: the vision stage's compaction of this prefill (keyed to the returned cache at the end).
        images: per-image stats of this prefill, from the last stage that ran; published to
            `handle.stats` when the call returns.
        llm_spans: the LLM stage's (image spans, base stats) for the language model's prefill.
        llm: the LLM stage's running language-model forward (`llm_stage._Forward`).
    """

    pre_encoded: bool = False
    use_cache: bool | None = None
    prefill: _PrefillState | None = None
    images: list[ImageStats] | None = None
    llm_spans: Any = None
    llm: Any = None


class CallScope:
    """One `Call` per top-level forward and thread: made by a pre-hook that runs before every other
    pre-hook of the model, dropped by an `always_call` forward hook (so also when the forward raises),
    which publishes the call's stats to `handle.stats` when it returned.

    A new call always starts from a fresh `Call`, even if an earlier one in the thread was cut short
    by an exception torch does not route to forward hooks (KeyboardInterrupt).  One call at a time per
    thread: a top-level forward of the same model nested inside another in one thread (nothing in
    transformers does that) would replace the outer call's state.
    """

    def __init__(self, model: nn.Module, handle: Any) -> None:
        self.handle = handle
        self._local = threading.local()
        self._handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._end, always_call=True)]

    @property
    def current(self) -> Call | None:
        """The calling thread's running top-level call, or None outside one."""
        return getattr(self._local, "call", None)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        self._local.call = Call(pre_encoded=mm.get("image") is not None, use_cache=kwargs.get("use_cache"))

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self._local.call = self.current, None
        if call is not None and output is not None and call.images is not None:
            self.handle._set_stats(DropStats(images=call.images))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._local = threading.local()


class VisionDropEngine:
    """Runs one vision-stage method on a model through its adapter.

    The adapter supplies: `encode(kwargs) -> encoder output` (runs the model's own
    `get_image_features`), `describe(encoder_output) -> list[ImageTokens]` (one per pooler_output
    entry, layout + CLS rows), `with_features(encoder_output, per-image rows) -> encoder output`,
    `image_token_id`, `pad_token_id`.  An adapter whose pooler_output is not one entry per image
    (InternVL: one per tile) supplies `split(encoder_output, input_ids) -> (per-image rows, ImageTokens)`
    instead of `describe`.  For methods that make new rows
    (`Selection.new_rows`) it also supplies `project(rows) -> LLM-space rows`.

    Per-forward state goes in `scope.current` (a `Call`); the only state kept here is the weak
    cache -> `_PrefillState` map that decode steps read.
    """

    def __init__(self, adapter: Any, method: VisionMethod, scope: CallScope) -> None:
        self.adapter = adapter
        self.method = method
        self.scope = scope
        self.model: nn.Module = adapter.model
        self._signature = inspect.signature(self.model.forward)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> _PrefillState
        self._handles = [
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            # prepended: runs before the scope's always-called hook drops the call
            self.model.register_forward_hook(self._post_hook, with_kwargs=True, prepend=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._states = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = self._signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop("kwargs", None)
        if isinstance(extra, dict):
            kw.update(extra)
        mm = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values") is not None or mm.get("image") is not None:
            call = self.scope.current
            if call is None:
                raise AssertionError("vlmdrop: a forward with images ran without its per-call state")
            return (), self._prefill(kw, call)
        cache = kw.get("cache")
        if cache is not None:
            try:
                state = self._states.get(cache)
            except TypeError:
                state = None
            if state is not None:
                return (), self._decode(kw, state, cache)
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self.scope.current
        if call is None or call.prefill is None:
            return
        cache = getattr(output, "cache", None)
        if cache is None and isinstance(output, dict):
            cache = output.get("past_key_values")
        if cache is not None:
            self._states[cache] = call.prefill

    # ---------------------------------------------------------------- prefill
    def _prefill(self, kw: dict, call: Call) -> dict:
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError("vlmdrop needs input_ids (with image placeholders) when images are passed; "
                             "inputs_embeds with images is not supported")
        cache = kw.get("cache")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError("vlmdrop: images in a forward that continues a non-empty cache are not supported")
        if kw.get("pixel_values") is not None:
            enc = self.adapter.encode(kw)
            kw["pixel_values"] = None
            kw["mm_encoder_outputs"] = {**(kw.get("mm_encoder_outputs") or {}), "image": enc}
        enc = kw["mm_encoder_outputs"]["image"]
        split = getattr(self.adapter, "split", None)  # adapters whose pooler_output is not one entry per image
        feats, images = split(enc, input_ids) if split is not None else (list(enc.pooler_output), self.adapter.describe(enc))
        ph = input_ids == self.adapter.image_token_id  # (B, L)
        rows, cols = ph.nonzero(as_tuple=True)
        n_total = sum(im.n_before for im in images)
        if rows.numel() != n_total:
            raise ValueError(f"the input has {rows.numel()} image placeholders but the images give {n_total} visual rows")

        generator = self.method_generator()
        keep_ph = torch.zeros(n_total, dtype=torch.bool, device=input_ids.device)
        stats, new_feats, offset = [], [], 0
        for feat, image in zip(feats, images):
            image.sample = int(rows[offset])
            n_keep = resolve_budget(self.method.config.budget, image.n_before)
            sel = self.method.select(image, n_keep, generator=generator)
            kept = sel.kept_indices
            n_rows = int(kept.numel()) + sel.n_new  # kept positions + new (merged / pooled) rows
            if not self.method.exact_budget:
                n_keep = n_rows
            elif n_rows != n_keep:
                raise AssertionError(f"{self.method.config.name} gave {n_rows} rows, budget says {n_keep}")
            # placeholders are identical tokens: with new rows the image keeps its first n_rows slots
            slots = kept if sel.n_new == 0 else torch.arange(n_rows)
            keep_ph[offset + slots.to(keep_ph.device)] = True
            out_rows = feat[kept.to(feat.device)]  # (n_kept - n_new, D)
            if sel.n_new:
                made = self.adapter.project(sel.new_rows).to(device=feat.device, dtype=feat.dtype)  # (n_new, D)
                out_rows = torch.cat([out_rows, made])
            new_feats.append(out_rows)
            groups = None if sel.new_groups is None else [g.cpu() for g in sel.new_groups]
            stats.append(ImageStats(sample=image.sample, n_before=image.n_before, n_kept=n_keep,
                                    kept_indices=kept.cpu(), crop_budgets=list(sel.crop_budgets),
                                    crop_kept=list(sel.crop_kept), method=self.method.config.name,
                                    n_new=sel.n_new, new_groups=groups))
            offset += image.n_before
        call.images = stats
        kw["mm_encoder_outputs"] = {**kw["mm_encoder_outputs"], "image": self.adapter.with_features(enc, new_feats)}
        if bool(keep_ph.all()):
            return kw  # nothing removed: the sequence is untouched

        keep = torch.ones_like(ph)
        keep[rows[~keep_ph], cols[~keep_ph]] = False
        plan = plan_compaction(keep)
        l_orig = input_ids.shape[1]
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"vlmdrop needs a 2-D attention_mask, got shape {tuple(mask.shape)}")
        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.arange(l_orig, device=input_ids.device)[None]  # what the model would use
        elif pos.dim() != 2:
            raise ValueError(f"vlmdrop needs 2-D position_ids, got shape {tuple(pos.shape)}")
        kw["input_ids"] = gather_rows(input_ids, plan, fill=self.adapter.pad_token_id)
        base_mask = mask if mask is not None else torch.ones_like(input_ids)
        new_mask = gather_rows(base_mask, plan, fill=0)
        mask_needed = not bool(plan.valid.all())
        kw["attention_mask"] = new_mask if (mask is not None or mask_needed) else None
        kw["position_ids"] = compact_positions(pos, plan)
        if kw.get("labels") is not None:
            kw["labels"] = gather_rows(kw["labels"], plan, fill=-100)
        call.prefill = _PrefillState(orig_len=l_orig, new_len=plan.length, prefix_mask=new_mask,
                                      removed=plan.removed, mask_needed=mask_needed)
        return kw

    def method_generator(self) -> torch.Generator | None:
        seed = getattr(self.method.config, "seed", None)
        if seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(int(seed))
        return g

    # ----------------------------------------------------------------- decode
    def _decode(self, kw: dict, state: _PrefillState, cache: Any) -> dict:
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        q_len = x.shape[1]
        past_new = int(cache.get_seq_length())
        tail = past_new - state.new_len + q_len
        mask = kw.get("attention_mask")
        if mask is not None or state.mask_needed:
            kw["attention_mask"] = extend_mask(state.prefix_mask, mask, orig_prefix=state.orig_len, tail=tail)
        pos = kw.get("position_ids")
        removed = state.removed.to(x.device)[:, None]  # (B, 1)
        if pos is None:
            past_orig = state.orig_len + past_new - state.new_len
            pos = torch.arange(past_orig, past_orig + q_len, device=x.device)[None]
        kw["position_ids"] = pos - removed
        return kw
