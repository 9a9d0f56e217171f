"""The one per-forward state of a patched model (`Call`), its thread-local scope (`CallScope`), and the
state a prefill leaves on its cache object for the decode steps (`CacheState`).

A `Call` is created by the prefill hook (`adapters/prefill.py`) at the start of every top-level forward
in the calling thread and dropped by the scope's always-called forward hook, also when the forward
raises; so a failed call leaves nothing behind and two threads' calls never share anything.  Every
stage reads and writes only the running call: the prefill hook (layouts, what the vision stage kept,
the LLM-stage spans), the LLM stage's decoder hooks (its running language-model forward, its decode
record), and the end hook, which keys the call's `CacheState` to the returned cache and publishes the
call's stats to `handle.stats` -- once per prefill, read by no stage.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmdrop.interface import ImageTokens
from vlmdrop.stats import DropStats, ImageStats

if TYPE_CHECKING:
    from .llm_stage import LLMDecode, LLMForward


@dataclass
class EncodeRecord:
    """What the captures record during one `get_image_features` call (in the calling thread).

    `generate` encodes the images before its first forward, outside any `Call`, so the adapter's
    `on_encoded` attaches what it derives from this record to the encoder output, and the forward
    that consumes the output finds it there.

    Attributes:
        cls_rows: role -> (crops, H, T) saliency row of that ViT layer over its T tokens (CLS first when the
            tower has one): the CLS attention row (or its pre-softmax logits), or the attention received.
        keys: (crops, T, Dh) the feature layer's keys, averaged over heads; None = not captured.
        hidden: (crops, N', C) the projector's input; None = not captured.
        queries: role -> (crops, D) CLS query, or (crops, T, D) every query ("received"), waiting for its
            layer's keys.
    """

    cls_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    queries: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ImageSpan:
    """One image's tokens in the sequence the language model receives.

    Attributes:
        sample: batch row.
        positions: (n,) ascending sequence positions of the image's tokens.
        base: what reaches the language model of this image (the vision stage's record; without one,
            every row kept); `kept_indices` index the image's `n_before` positions.
    """

    sample: int
    positions: torch.Tensor
    base: ImageStats


@dataclass
class VisionDecode:
    """What the vision stage's compaction of a prefill means for the decode steps on its cache."""

    orig_len: int  # L: the caller's prefill length
    new_len: int  # L': the compacted prefill length
    prefix_mask: torch.Tensor  # (B, L') mask of the compacted prefill
    removed: torch.Tensor  # (B,) positions removed per row
    mask_needed: bool  # the compaction introduced padding, so a mask must always be passed
    positions: str = "compact"  # "compact": decode positions move back by `removed`; "original": kept as they are
    rope_deltas: Any = None  # "original" (M-RoPE): the prefill's rope deltas, for decode steps without positions


@dataclass
class CacheState:
    """What one prefill leaves on the cache object it returned: one record per stage that changed it."""

    vision: VisionDecode | None = None
    llm: LLMDecode | None = None


@dataclass
class Call:
    """Everything one top-level forward of the patched model computes; never shared between calls.

    Attributes:
        pre_encoded: the caller passed the images already encoded (`mm_encoder_outputs`, as `generate`
            does) rather than `pixel_values`.
        use_cache: the caller's `use_cache` argument (None when not given).
        images: the images of this prefill (layout, CLS rows, features), from `adapter.images(...)`.
        kept: what the vision stage kept of each image (None without a vision stage).
        spans: each image's tokens in the language model's input, for the LLM stage (None without one).
        llm: the LLM stage's running language-model forward.
        cache: the state this prefill leaves on its cache (filled by the stages), or, at a decode step,
            the state its prefill left.
        stats: per-image stats of this prefill from the last stage that ran; published to `handle.stats`
            when the call returns.
    """

    pre_encoded: bool = False
    use_cache: bool | None = None
    images: list[ImageTokens] | None = None
    kept: list[ImageStats] | None = None
    spans: list[ImageSpan] | None = None
    llm: LLMForward | None = None
    cache: CacheState | None = None
    stats: list[ImageStats] | None = None


class CallScope:
    """One `Call` per top-level forward and thread, and the weak map cache -> `CacheState`.

    `begin` is called by the prefill hook (the model's first pre-hook); the always-called forward hook
    registered here ends the call: it keys the call's `CacheState` to the returned cache, publishes the
    call's stats to `handle.stats` when the forward returned, and drops the call.  A new call always
    starts from a fresh `Call`, even if an earlier one in the thread was cut short by an exception torch
    does not route to forward hooks (KeyboardInterrupt).  One call at a time per thread: a top-level
    forward of the same model nested inside another in one thread (nothing in transformers does that)
    would replace the outer call's state.
    """

    def __init__(self, model: nn.Module, handle: Any) -> None:
        self.handle = handle
        self._local = threading.local()
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache object -> CacheState
        self._handle = model.register_forward_hook(self._end, always_call=True)

    @property
    def current(self) -> Call | None:
        """The calling thread's running top-level call, or None outside one."""
        return getattr(self._local, "call", None)

    def begin(self, kwargs: dict) -> Call:
        """Start the calling thread's call for a top-level forward called with `kwargs`."""
        mm = kwargs.get("mm_encoder_outputs") or {}
        call = Call(pre_encoded=mm.get("image") is not None, use_cache=kwargs.get("use_cache"))
        self._local.call = call
        return call

    def cache_state(self, cache: Any) -> CacheState | None:
        """What the prefill that returned `cache` left on it, or None."""
        if cache is None:
            return None
        try:
            return self._caches.get(cache)
        except TypeError:  # not weak-referenceable: never keyed
            return None

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self._local.call = self.current, None
        if call is None or output is None:
            return
        state = call.cache
        if state is not None and (state.vision is not None or state.llm is not None):
            cache = getattr(output, "cache", None)
            if cache is None and isinstance(output, dict):
                cache = output.get("past_key_values")
            if cache is not None and self.cache_state(cache) is not state:
                self._caches[cache] = state
        if call.stats is not None:
            self.handle.stats = DropStats(images=call.stats)

    def remove(self) -> None:
        self._handle.remove()
        self._local = threading.local()
        self._caches = weakref.WeakKeyDictionary()
