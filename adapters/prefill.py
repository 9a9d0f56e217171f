"""The one top-level hook of a patched HF VLM: each prefill is bound, encoded and described once, the
vision stage selects and compacts, the LLM stage gets its spans; each decode step is rewritten once.

Prefill (a forward that carries images): bind the forward's arguments, encode `pixel_values` with the
model's own `get_image_features` when the caller did not (`generate` passes `mm_encoder_outputs`), ask
the adapter for every image's rows and layout (`images`), run the vision-stage method on them
(`vlmdrop.methods.select`), hand the model the kept rows and compact everything that has the sequence
length -- `input_ids` (placeholders), `attention_mask`, `position_ids`, `labels` -- re-padding the batch
on the left; then record where each image's tokens now sit (`Call.spans`) for the LLM stage's decoder
hooks.  Decode step on a cache this prefill returned: rewrite the caller's full-length mask and
positions to match the shorter cache.  No class of transformers is touched.

Everything lives in the running `Call` (`adapters/state.py`); this hook keeps only the forward's
signature.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
from torch import nn

from vlmdrop import kernels
from vlmdrop.interface import LLMMethod, VisionMethod
from vlmdrop.methods.select import select_images
from vlmdrop.ops.compact import extend_mask, gather_positions, plan_compaction
from vlmdrop.stats import ImageStats

from .base import HFVlmAdapter, ImageInput
from .state import CacheState, Call, CallScope, ImageSpan, VisionDecode

logger = logging.getLogger("vlmdrop")


class PrefillHook:
    """The top-level forward pre-hook (run before every other pre-hook of the model) that starts the
    call's state, runs the vision stage at prefill, hands the LLM stage its spans, and rewrites decode
    steps after a vision-stage compaction."""

    def __init__(self, adapter: HFVlmAdapter, scope: CallScope, *, vision: VisionMethod | None,
                 llm: LLMMethod | None) -> None:
        self.adapter, self.scope, self.vision, self.llm = adapter, scope, vision, llm
        self.model: nn.Module = adapter.model
        self._signature = inspect.signature(self.model.forward)
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True, prepend=True)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.scope.begin(kwargs)
        bound = self._signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop("kwargs", None)
        if isinstance(extra, dict):
            kw.update(extra)
        self.adapter.check_inputs(kw)
        mm = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values") is not None or mm.get("image") is not None:
            return (), self._prefill(kw, call)
        call.cache = self.scope.cache_state(kw.get("cache"))
        if call.cache is not None and call.cache.vision is not None:
            return (), self._decode(kw, call.cache.vision, kw["cache"])
        return None

    # ---------------------------------------------------------------- prefill
    def _prefill(self, kw: dict, call: Call) -> dict:
        if self.llm is not None and call.pre_encoded and call.use_cache is False and kw.get("cache") is None:
            raise ValueError(
                f"vlmdrop: {self.llm.config.name!r} is an LLM-stage method and generate(use_cache=False) re-runs "
                "the prefill at every step (on the prompt plus the tokens generated so far), so the image tokens "
                "would be re-ranked by the newest token instead of the prompt's last token: call generate with "
                "use_cache=True (the default).  (A forward given pre-encoded images, mm_encoder_outputs, with "
                "use_cache=False is taken for such a step; a single model(**inputs, use_cache=False) with "
                "pixel_values is fine.)")
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
        inputs = self.adapter.images(enc, input_ids, layouts=self.vision is not None)
        ph_rows, _ = (input_ids == self.adapter.image_token_id).nonzero(as_tuple=True)  # (P,) batch row of each
        counts = [int(im.rows.shape[0]) for im in inputs]
        if ph_rows.numel() != sum(counts):
            raise ValueError(f"the input has {ph_rows.numel()} image placeholders but the images give "
                             f"{sum(counts)} visual rows")
        starts = [sum(counts[:i]) for i in range(len(counts))]
        samples = [int(ph_rows[s]) if n else 0 for s, n in zip(starts, counts)]
        call.cache = CacheState()
        if self.vision is not None:
            call.kept = self._vision(kw, call, inputs, samples)
            call.stats = call.kept
        if self.llm is not None:
            call.spans = self._spans(kw["input_ids"], call.kept, counts, samples)
        return kw

    def _vision(self, kw: dict, call: Call, inputs: list[ImageInput], samples: list[int]) -> list[ImageStats]:
        """Select each image's rows, hand them to the model, compact the sequence; the images' records."""
        input_ids = kw["input_ids"]
        images = [dataclasses.replace(im.tokens, sample=s) for im, s in zip(inputs, samples)]
        call.images = images
        chosen = select_images(self.vision, images)
        ph = input_ids == self.adapter.image_token_id  # (B, L)
        rows, cols = ph.nonzero(as_tuple=True)  # (P,) each
        keep_ph = torch.zeros(rows.numel(), dtype=torch.bool, device=input_ids.device)  # (P,)
        # "original" positions: the placeholder whose position each placeholder slot takes
        original = self.adapter.vision_positions == "original"
        pos_src = torch.arange(rows.numel(), device=input_ids.device)  # (P,)
        new_feats, offset = [], 0
        for im, ch in zip(inputs, chosen):
            sel, feat = ch.selection, im.rows  # feat: (n_before, D)
            kept = sel.kept_indices
            # placeholders are identical tokens: with new rows the image keeps its first n_kept slots
            slots = kept if sel.n_new == 0 else torch.arange(ch.stats.n_kept)
            keep_ph[offset + slots.to(keep_ph.device)] = True
            if sel.n_new and original:  # kept rows keep their own positions; a new row takes its group's first
                reps = torch.stack([g[0] for g in sel.new_groups]) if sel.new_groups else torch.arange(sel.n_new)
                src = torch.cat([kept, reps.to(kept.device)]).to(pos_src.device)  # (n_kept,)
                pos_src[offset + slots.to(pos_src.device)] = offset + src
            out_rows = feat[kept.to(feat.device)]  # (n_kept - n_new, D)
            if sel.n_new:
                made = self.adapter.project(sel.new_rows).to(device=feat.device, dtype=feat.dtype)  # (n_new, D)
                out_rows = torch.cat([out_rows, made])
            new_feats.append(out_rows)
            offset += feat.shape[0]
        selections = [ch.selection for ch in chosen]
        kw["mm_encoder_outputs"] = {**kw["mm_encoder_outputs"],
                                    "image": self.adapter.keep_features(kw["mm_encoder_outputs"]["image"], new_feats,
                                                                        selections)}
        if not bool(keep_ph.all()):
            pos_cols = None
            if original:  # (B, L) column whose position each column takes
                pos_cols = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).clone()
                pos_cols[rows, cols] = cols[pos_src]
            self._compact(kw, call, rows[~keep_ph], cols[~keep_ph], pos_cols)
        return [ch.stats for ch in chosen]

    def _compact(self, kw: dict, call: Call, rows: torch.Tensor, cols: torch.Tensor,
                 pos_cols: torch.Tensor | None = None) -> None:
        """Remove the placeholders at (`rows`, `cols`) from every sequence-length argument of `kw`;
        `pos_cols` ("original" positions): the (B, L) column whose position each column keeps."""
        input_ids = kw["input_ids"]  # (B, L)
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        keep[rows, cols] = False
        l_orig = input_ids.shape[1]
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"vlmdrop needs a 2-D attention_mask, got shape {tuple(mask.shape)}")
        original = self.adapter.vision_positions == "original"
        pos = kw.get("position_ids")
        rope_deltas, mrope = None, None
        if original:  # (B, L), (3, B, L) or (4, B, L): the positions the unmodified model would use
            mrope = self.adapter.prefill_positions(kw)
            rope_deltas = getattr(self.adapter.base, "rope_deltas", None)
            pos = None  # the kernel's renumbered positions are not used
        elif pos is not None and pos.dim() != 2:
            raise ValueError(f"vlmdrop needs 2-D position_ids, got shape {tuple(pos.shape)}")
        # ids, mask and positions in one launch (vlmdrop.kernels.compact_rows); the ids ride as a (B, L, 1) row
        ids, valid, new_pos = kernels.compact_rows(input_ids[..., None], keep, position_ids=pos, attention_mask=mask,
                                                   fill=self.adapter.pad_token_id)
        kw["input_ids"] = ids[..., 0]  # (B, L')
        new_mask = valid.to(mask.dtype if mask is not None else torch.long)  # (B, L') the caller's mask dtype
        removed = l_orig - keep.sum(dim=1)  # (B,)
        mask_needed = bool((removed != removed.min()).any())  # rows lost different counts: new left padding
        kw["attention_mask"] = new_mask if (mask is not None or mask_needed) else None
        if original:  # the kept tokens' own positions, gathered into the same right-aligned slots
            kw["position_ids"] = gather_positions(mrope, plan_compaction(keep), columns=pos_cols)  # (..., B, L')
        else:
            kw["position_ids"] = new_pos  # (B, L')
        if kw.get("mm_token_type_ids") is not None:
            kw["mm_token_type_ids"] = kernels.compact_rows(kw["mm_token_type_ids"][..., None], keep, fill=0)[0][..., 0]
        if kw.get("labels") is not None:
            kw["labels"] = kernels.compact_rows(kw["labels"][..., None], keep, fill=-100)[0][..., 0]
        call.cache.vision = VisionDecode(orig_len=l_orig, new_len=ids.shape[1], prefix_mask=new_mask,
                                         removed=removed, mask_needed=mask_needed,
                                         positions=self.adapter.vision_positions, rope_deltas=rope_deltas)

    def _spans(self, input_ids: torch.Tensor, kept: list[ImageStats] | None, counts: list[int],
               samples: list[int]) -> list[ImageSpan]:
        """Each image's tokens in the (compacted) `input_ids` the language model receives."""
        if kept is None:  # no vision stage: every row of every image
            kept = [ImageStats(sample=s, n_before=n, n_kept=n, kept_indices=torch.arange(n), crop_budgets=[],
                               crop_kept=[], method="") for s, n in zip(samples, counts)]
        _, cols = (input_ids == self.adapter.image_token_id).nonzero(as_tuple=True)  # (P',)
        if cols.numel() != sum(k.n_kept for k in kept):
            raise AssertionError(f"vision stage kept {[k.n_kept for k in kept]} rows, the input has "
                                 f"{cols.numel()} placeholders")
        spans, offset = [], 0
        for st in kept:
            spans.append(ImageSpan(sample=st.sample, positions=cols[offset:offset + st.n_kept], base=st))
            offset += st.n_kept
        return spans

    # ----------------------------------------------------------------- decode
    def _decode(self, kw: dict, state: VisionDecode, cache: Any) -> dict:
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        q_len = x.shape[1]
        past_new = int(cache.get_seq_length())
        tail = past_new - state.new_len + q_len
        past_orig = state.orig_len + past_new - state.new_len
        mask = kw.get("attention_mask")
        pos = kw.get("position_ids")
        removed = state.removed.to(x.device)[:, None]  # (B, 1)
        if state.positions == "original":
            # the unmodified model's positions: the caller's, or those the model would derive itself
            if pos is None:
                pos = self.adapter.decode_positions(kw, past=past_orig, q_len=q_len, rope_deltas=state.rope_deltas)
            elif pos.dim() == 3 and pos.shape[0] == 4:  # (text, t, h, w): the text row counts slots (masks)
                pos = torch.cat([pos[:1] - removed[None], pos[1:]])
            kw["position_ids"] = pos
        else:
            if pos is None:
                pos = torch.arange(past_orig, past_orig + q_len, device=x.device)[None]  # (1, q)
            kw["position_ids"] = pos - removed  # (B, q)
        if mask is not None or state.mask_needed:
            kw["attention_mask"] = extend_mask(state.prefix_mask, mask, orig_prefix=state.orig_len, tail=tail)
        return kw
