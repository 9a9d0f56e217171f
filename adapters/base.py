"""The adapter contract and registry: where, in a given architecture, scores are taken and tokens removed.

What a Hugging Face VLM adapter (`HFVlmAdapter`, one file per family) must provide:
 1. `supported` (class names, for errors) and `accepts(model)`; `__init__(model)` sets the attributes below.
 2. `base` (the inner `*Model`, with `get_image_features`, `multi_modal_projector`, `language_model`).
 3. `image_token_id`, `pad_token_id`: the placeholder token and the id used to re-pad compacted rows.
 4. ViT facts: `layers` (encoder layers), `attention_attr` and `qk_names` (the attention module and the
    submodules whose outputs are its queries/keys), `num_heads`, `scale`, `feature_layer` (0-based),
    `has_cls` (whether position 0 is a CLS token: a method's `score="auto"` is then "cls", else "received").
 5. `recorded_arg`: the `get_image_features` argument handed to `on_encoded` (`image_sizes`, `pixel_values`).
 6. `encode(kw)`: run the model's own `get_image_features` as its forward would.
 7. `on_encoded(out, arg, record)`: attach to `out` what the encode's captures recorded (`EncodeRecord`).
 8. `images(out, input_ids, layouts=...)`: every image's visual rows and `ImageTokens`, in batch order.
 9. `with_features(out, rows)`: the encoder output holding the kept rows; `project(rows)`: new rows -> LLM.
10. The LLM stage uses `base.language_model` (`layers`, `rotary_emb`, `config`): a Llama-style decoder
    whose layers receive `position_embeddings` (1-D RoPE, or M-RoPE's (cos, sin) per token).
11. Positions after a vision-stage compaction (`vision_positions`): "compact" (LLaVA, InternVL: the kept
    tokens are renumbered contiguously) or "original" (M-RoPE: `prefill_positions` gives the positions the
    unmodified model would use for the caller's prompt, which are gathered, and `decode_positions` those of
    a decode step called without `position_ids`).  Optional: `check_inputs(kw)` (refuse what the family
    does not support) and `keep_features(enc, rows, selections)` (when more than the rows must follow them,
    e.g. Qwen3-VL's DeepStack features).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vlmdrop.interface import ImageTokens, LLMMethod, VisionMethod

_ADAPTERS: list[tuple[tuple[str, ...], Callable[[nn.Module], "Adapter"]]] = []


class Installation:
    """Everything one `apply` put on a model, removable in one call (last in, first out)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.parts: list[Any] = []

    def remove(self) -> None:
        while self.parts:
            self.parts.pop().remove()


class Adapter(ABC):
    """What `vlmdrop.apply` needs of a model family: which models it takes, its own options, whether it
    runs LLM-stage methods, and `install`."""

    #: names of the model classes this adapter supports (for error messages)
    supported: ClassVar[tuple[str, ...]] = ()
    #: adapter-level `apply` keywords that are not method parameters (open_clip's `layer`)
    options: ClassVar[tuple[str, ...]] = ()
    #: whether LLM-stage methods (FastV, PyramidDrop) can run on this family
    supports_llm_stage: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.supported

    @abstractmethod
    def install(self, vision: VisionMethod | None, llm: LLMMethod | None, handle: Any,
                **options: Any) -> Installation:
        """Install hooks running `vision` and/or `llm` (at least one); `handle` receives the stats."""


@dataclass(frozen=True)
class ImageInput:
    """One image of a prefill as the language model would receive it.

    Attributes:
        rows: (n_before, D) its visual rows, in the order they fill its placeholders.
        tokens: its layout, CLS rows and features (`sample` left 0: the caller knows the batch row);
            None when only the rows were asked for (`layouts=False`).
    """

    rows: torch.Tensor
    tokens: ImageTokens | None


class HFVlmAdapter(Adapter):
    """The contract of a Hugging Face VLM family whose images fill `<image>` placeholders of `input_ids`
    (see the module docstring); `install` is shared (`adapters/hf_vlm.py`)."""

    supports_llm_stage: ClassVar[bool] = True
    attention_attr: ClassVar[str] = "self_attn"
    qk_names: ClassVar[tuple[str, str]] = ("q_proj", "k_proj")
    recorded_arg: ClassVar[str | tuple[str, ...]] = "image_sizes"  # a tuple: `on_encoded` gets a dict of them
    #: whether the ViT's position 0 is a CLS token (a method's score="auto" resolves to "cls" or "received")
    has_cls: ClassVar[bool] = True

    #: instance attributes `__init__` must set (checked at install, naming the missing ones)
    REQUIRED = ("base", "layers", "num_heads", "scale", "feature_layer", "image_token_id", "pad_token_id")
    base: nn.Module
    layers: list[nn.Module]
    num_heads: int
    scale: float
    feature_layer: int
    image_token_id: int
    pad_token_id: int

    #: "compact" (kept tokens renumbered contiguously) or "original" (they keep the unmodified model's
    #: positions, `prefill_positions` / `decode_positions`) after a vision-stage compaction
    vision_positions: ClassVar[str] = "compact"

    def check_inputs(self, kw: dict) -> None:
        """Called with every forward's keyword arguments; raises ValueError for inputs the family does not
        support."""

    def prefill_positions(self, kw: dict) -> torch.Tensor:
        """("original" families) the `position_ids` the unmodified model would use for this prefill's
        uncompacted prompt, in the layout its forward accepts."""
        raise NotImplementedError(f"{type(self).__name__} keeps vision_positions={self.vision_positions!r}")

    def decode_positions(self, kw: dict, *, past: int, q_len: int, rope_deltas: Any) -> torch.Tensor:
        """("original" families) the `position_ids` the unmodified model would use at a decode step called
        without them, `past` tokens of the caller's sequence already in its cache."""
        raise NotImplementedError(f"{type(self).__name__} keeps vision_positions={self.vision_positions!r}")

    def captures(self, vision: VisionMethod) -> list[Any]:
        """The hooks recording what `vision` needs during each encode (each with `begin(record)`, `end()`,
        `remove()`); default: CLS rows from `qk_names` hooks, feature-layer keys and projector input."""
        from .hf_vlm import cls_captures

        return cls_captures(self, vision)

    def keep_features(self, enc: Any, rows: list[torch.Tensor], selections: list[Any]) -> Any:
        """`with_features(enc, rows)`; `selections` (each image's `Selection`) for families whose encoder
        output holds more per-row tensors that must follow the kept rows."""
        return self.with_features(enc, rows)

    def attention(self, layer: int) -> nn.Module:
        """The attention module of ViT layer `layer`."""
        return getattr(self.layers[layer], self.attention_attr)

    @abstractmethod
    def encode(self, kw: dict) -> Any:
        """The model's own `get_image_features(...)` output for the forward's keyword arguments `kw`."""

    @abstractmethod
    def on_encoded(self, out: Any, arg: Any, record: Any) -> None:
        """Called inside every `get_image_features` call with its output, its `recorded_arg` argument (a dict
        name -> value when `recorded_arg` is a tuple of names) and
        the `EncodeRecord` its captures filled; attaches what `images` will need to `out`."""

    @abstractmethod
    def images(self, enc: Any, input_ids: torch.Tensor, *, layouts: bool = True) -> list[ImageInput]:
        """Every image's rows (and, with `layouts`, its `ImageTokens`) in batch/prompt order, from an
        encoder output and the `input_ids` whose placeholders it fills; ValueError when they disagree."""

    @abstractmethod
    def with_features(self, enc: Any, rows: list[torch.Tensor]) -> Any:
        """A copy of `enc` whose visual rows are `rows` (one (n_kept, D) tensor per image, in order)."""

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, C) projector-input rows -> (n, D) LLM-space rows through the model's own projector
        (outside any encode, so the captures record nothing)."""
        return self.base.multi_modal_projector(rows)

    def install(self, vision: VisionMethod | None, llm: LLMMethod | None, handle: Any,
                **options: Any) -> Installation:
        from .hf_vlm import install_hf

        if options:
            raise ValueError(f"{type(self.model).__name__} takes no adapter options; got {sorted(options)}")
        missing = [a for a in self.REQUIRED if not hasattr(self, a)]
        if missing:
            raise TypeError(f"{type(self).__name__} does not set {missing} (see adapters/base.py)")
        return install_hf(self, vision, llm, handle)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append((cls.supported, cls))
    return cls


def supported_classes() -> list[str]:
    return sorted(name for names, _ in _ADAPTERS for name in names)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s class, or a ValueError naming the supported classes."""
    for _, cls in _ADAPTERS:
        if cls.accepts(model):
            return cls(model)
    raise ValueError(
        f"vlmdrop has no adapter for {type(model).__name__}; supported model classes: {', '.join(supported_classes())}"
    )
