"""What every Hugging Face VLM adapter shares: installing the stages, the instance-level class swap
that reports `get_image_features` calls, and mapping new rows through the model's own projector.

A subclass sets, in `__init__`: `base` (the inner `*Model`), `layers` (ViT layers), `num_heads`,
`scale`, `feature_layer`, and the class attributes below; and implements `_on_encoded(out, arg)`,
called with each `get_image_features` output and its `recorded_arg` argument, while the call's
captures are still open.  `_on_encoded` attaches what it learns to the output (`ENCODED_ATTR`, on
its per-image feature tensors or on the output object), so the description travels with the features
to the forward that consumes them — whichever thread or call that is — and nothing about an encode
is kept on the adapter.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from vlmdrop.interface import LLMMethod, VisionMethod

from .base import Adapter
from .engine import CallScope, VisionDropEngine
from .llm_stage import LLMStageSpans
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


@functools.cache
def recording_class(cls: type, arg: str) -> type:
    """A subclass of `cls` whose `get_image_features` is run by the instance's sink as
    `sink(run, <arg>)`, `run()` being the original call (so the sink can bracket it)."""

    sig = inspect.signature(cls.get_image_features)

    # `wraps` keeps the original signature visible: `generate` reads it to decide to pre-encode the images
    @functools.wraps(cls.get_image_features)
    def get_image_features(self, *args, **kwargs):
        sink = self.__dict__.get("_vlmdrop_sink")
        if sink is None:
            return super(sub, self).get_image_features(*args, **kwargs)
        return sink(lambda: super(sub, self).get_image_features(*args, **kwargs),
                    sig.bind_partial(self, *args, **kwargs).arguments.get(arg))

    sub = type(cls.__name__, (cls,), {"get_image_features": get_image_features, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "_vlmdrop_original": cls})
    return sub


class Install:
    """Everything one `apply` put on the model, removable in one call (last in, first out)."""

    def __init__(self) -> None:
        self.parts: list[Any] = []

    def remove(self) -> None:
        while self.parts:
            self.parts.pop().remove()


class ClassSwap:
    """Swap one module instance's class (never the class itself) and restore it on `remove()`."""

    def __init__(self, module: nn.Module, new_cls: type, sink: Any) -> None:
        self.module, self.original = module, type(module)
        module.__class__ = new_cls
        module.__dict__["_vlmdrop_sink"] = sink

    def remove(self) -> None:
        self.module.__class__ = self.original
        self.module.__dict__.pop("_vlmdrop_sink", None)


class HFVlmAdapter(Adapter):
    """Shared installation for LLaVA-family and InternVL adapters."""

    supports_llm_stage = True
    attention_attr = "self_attn"  # ViT layer attribute holding the attention module
    qk_names = ("q_proj", "k_proj")  # modules whose outputs are the queries / keys the layer attends with
    recorded_arg = "image_sizes"  # `get_image_features` argument reported to `_on_encoded`

    base: nn.Module
    layers: list[nn.Module]
    num_heads: int
    scale: float
    feature_layer: int
    capture: ClsRowCapture | None = None
    features: FeatureCapture | None = None

    def attention(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.attention_attr)

    def install(self, method: VisionMethod | LLMMethod, handle: Any, *, llm: LLMMethod | None = None) -> Install:
        """Install `method` (vision or LLM stage); `llm` stacks an LLM-stage method after a vision one."""
        vision = None if isinstance(method, LLMMethod) else method
        llm = method if isinstance(method, LLMMethod) else llm
        inst = Install()
        try:
            scope = CallScope(self.model, handle)  # its pre-hook runs first, its always-called hook last
            inst.parts.append(scope)
            if vision is not None:
                q_name, k_name = self.qk_names
                roles = vision.vit_layers(len(self.layers), self.feature_layer)
                self.capture = ClsRowCapture({r: self.attention(i) for r, i in roles.items()},
                                             num_heads=self.num_heads, scale=self.scale, q_name=q_name,
                                             k_name=k_name,
                                             logit_roles=tuple(getattr(vision.config, "logit_roles", ())))
                inst.parts.append(self.capture)
                needs = set(getattr(vision.config, "needs", ()))
                if needs:  # feature-layer keys and the projector's input, for new (merged / pooled) rows
                    keys = getattr(self.attention(self.feature_layer), k_name)
                    self.features = FeatureCapture(
                        k_proj=keys if "vit_keys" in needs else None,
                        projector=self.base.multi_modal_projector if "vit_hidden" in needs else None,
                        num_heads=self.num_heads)
                    inst.parts.append(self.features)
                inst.parts.append(ClassSwap(self.base, recording_class(type(self.base), self.recorded_arg),
                                            self._encode_call))
                inst.parts.append(VisionDropEngine(self, vision, scope))
            if llm is not None:  # registered after the vision engine: its top-level hook sees the compacted input
                lm = self.base.language_model
                inst.parts.append(LLMStageSpans(self, llm, scope, language_model=lm, layers=list(lm.layers),
                                                rotary_emb=lm.rotary_emb, config=lm.config,
                                                vision_stage=vision is not None))
        except BaseException:
            inst.remove()
            raise
        return inst

    def _encode_call(self, run: Any, arg: Any) -> Any:
        """Run one `get_image_features` call with this thread's captures open, describe its output."""
        captures = [c for c in (self.capture, self.features) if c is not None]
        for c in captures:
            c.begin()
        try:
            out = run()
            self._on_encoded(out, arg)
            return out
        finally:
            for c in captures:
                c.end()

    def _on_encoded(self, out: Any, arg: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, C) projector-input rows -> (n, D) LLM-space rows through the model's own projector
        (outside any encode, so the captures record nothing)."""
        return self.base.multi_modal_projector(rows)
