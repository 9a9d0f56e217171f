"""What every Hugging Face VLM adapter shares: `install_hf` (the captures, the instance-level class swap
that reports `get_image_features` calls, the prefill hook, the LLM stage), and small helpers.

Each `get_image_features` call runs with the captures recording into a fresh `EncodeRecord`; the
adapter's `on_encoded` attaches what it learns to the output (`ENCODED_ATTR`, on its per-image feature
tensors or on the output object), so the description travels with the features to the forward that
consumes them -- whichever thread or call that is -- and nothing about an encode is kept on the adapter.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from vlmdrop.interface import LLMMethod, VisionMethod
from vlmdrop.ops.attention import resolve_score

from .base import HFVlmAdapter, ImageInput, Installation
from .llm_stage import LLMStageEngine
from .prefill import PrefillHook
from .state import CallScope, EncodeRecord
from .vision_capture import ClsRowCapture, FeatureCapture


def feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    """ViT layer (0-based) whose output is `hidden_states[vision_feature_layer]`."""
    if not isinstance(vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer={vision_feature_layer!r}: vlmdrop supports a single int feature layer")
    if vision_feature_layer < 0:
        return num_layers + vision_feature_layer
    if vision_feature_layer == 0:
        raise ValueError("vision_feature_layer=0 selects the patch embeddings; no ViT layer to score")
    return vision_feature_layer - 1


#: attribute set on a `get_image_features` output (or its feature tensors) run while a method is applied
ENCODED_ATTR = "_vlmdrop_encoded"


def pooled_images(enc: Any, *, layouts: bool) -> list[ImageInput]:
    """`HFVlmAdapter.images` for families that attach each image's `ImageTokens` to its `pooler_output`
    tensor (`ENCODED_ATTR`): one image per entry (entries repeated by `generate` share one description)."""
    out = []
    for feat in enc.pooler_output:  # (n_before, D) each
        im = getattr(feat, ENCODED_ATTR, None) if layouts else None
        if layouts and im is None:
            raise ValueError("these image features were not encoded while vlmdrop was applied "
                             "(pass pixel_values, or call generate, with the method applied)")
        out.append(ImageInput(rows=feat, tokens=im))
    return out


def with_pooler_output(enc: Any, rows: Any) -> Any:
    """A copy of the encoder output `enc` whose `pooler_output` is `rows` (`HFVlmAdapter.with_features`)."""
    new = type(enc)(**{k: v for k, v in enc.items()})
    new.pooler_output = rows
    return new


@functools.cache
def recording_class(cls: type, arg: str) -> type:
    """A subclass of `cls` whose `get_image_features` is run by the instance's sink as
    `sink(run, <arg>)`, `run()` being the original call (so the sink can bracket it); `arg` a tuple of
    names: `sink(run, {name: value})`."""

    sig = inspect.signature(cls.get_image_features)

    # `wraps` keeps the original signature visible: `generate` reads it to decide to pre-encode the images
    @functools.wraps(cls.get_image_features)
    def get_image_features(self, *args, **kwargs):
        sink = self.__dict__.get("_vlmdrop_sink")
        if sink is None:
            return super(sub, self).get_image_features(*args, **kwargs)
        bound = sig.bind_partial(self, *args, **kwargs).arguments
        value = {a: bound.get(a) for a in arg} if isinstance(arg, tuple) else bound.get(arg)
        return sink(lambda: super(sub, self).get_image_features(*args, **kwargs), value)

    sub = type(cls.__name__, (cls,), {"get_image_features": get_image_features, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "_vlmdrop_original": cls})
    return sub


class ClassSwap:
    """Swap one module instance's class (never the class itself) and restore it on `remove()`."""

    def __init__(self, module: nn.Module, new_cls: type, sink: Any) -> None:
        self.module, self.original = module, type(module)
        module.__class__ = new_cls
        module.__dict__["_vlmdrop_sink"] = sink

    def remove(self) -> None:
        self.module.__class__ = self.original
        self.module.__dict__.pop("_vlmdrop_sink", None)


class _Encoder:
    """The sink of the swapped `get_image_features`: runs one call with the captures recording into a
    fresh `EncodeRecord`, then hands output and record to `adapter.on_encoded`."""

    def __init__(self, adapter: HFVlmAdapter, captures: list[Any]) -> None:
        self.adapter, self.captures = adapter, captures

    def __call__(self, run: Any, arg: Any) -> Any:
        record = EncodeRecord()
        for c in self.captures:
            c.begin(record)
        try:
            out = run()
            self.adapter.on_encoded(out, arg, record)
            return out
        finally:
            for c in self.captures:
                c.end()


def cls_captures(adapter: HFVlmAdapter, vision: VisionMethod) -> list[ClsRowCapture | FeatureCapture]:
    """The captures of a ViT whose q/k projections are submodules: per role its CLS row or the attention each
    patch receives (the method's `score`, resolved against `has_cls`) from q/k hooks, and (for new rows) the
    feature layer's keys and the projector's input."""
    q_name, k_name = adapter.qk_names
    roles = vision.vit_layers(len(adapter.layers), adapter.feature_layer)
    score = resolve_score(vision.score, has_cls=adapter.has_cls,
                          tower=f"vision tower of {type(adapter.model).__name__}")
    captures: list[ClsRowCapture | FeatureCapture] = [
        ClsRowCapture({r: adapter.attention(i) for r, i in roles.items()}, num_heads=adapter.num_heads,
                      scale=adapter.scale, q_name=q_name, k_name=k_name, logit_roles=vision.config.logit_roles,
                      score=score)]
    needs = set(vision.config.needs)
    if needs:  # feature-layer keys and the projector's input, for new (merged / pooled) rows
        keys = getattr(adapter.attention(adapter.feature_layer), k_name)
        captures.append(FeatureCapture(
            k_proj=keys if "vit_keys" in needs else None,
            projector=adapter.base.multi_modal_projector if "vit_hidden" in needs else None,
            num_heads=adapter.num_heads))
    return captures


def install_hf(adapter: HFVlmAdapter, vision: VisionMethod | None, llm: LLMMethod | None,
               handle: Any) -> Installation:
    """Install `vision` and/or `llm` on `adapter.model`; everything is removed by the returned installation."""
    inst = Installation(adapter)
    try:
        scope = CallScope(adapter.model, handle)  # its always-called hook ends each call
        inst.parts.append(scope)
        captures: list[Any] = []
        if vision is not None:
            captures = adapter.captures(vision)
            inst.parts.extend(captures)
            inst.parts.append(ClassSwap(adapter.base, recording_class(type(adapter.base), adapter.recorded_arg),
                                        _Encoder(adapter, captures)))
        if llm is not None:
            lm = adapter.base.language_model
            inst.parts.append(LLMStageEngine(language_model=lm, layers=list(lm.layers), rotary_emb=lm.rotary_emb,
                                             config=lm.config, method=llm, scope=scope))
        inst.parts.append(PrefillHook(adapter, scope, vision=vision, llm=llm))
    except BaseException:
        inst.remove()
        raise
    return inst
