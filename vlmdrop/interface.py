"""The contract between methods (which tokens to keep) and adapters (where, in a given model).

An adapter describes each image it is about to hand to the language model as an `ImageTokens`
record; a vision-stage method answers with a `Selection`.  Neither side knows the other's internals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .ops.budget import resolve_budget, validate_budget


@dataclass
class ImageTokens:
    """One image as the language model would receive it, before any token is removed.

    Positions are the `n_before` visual rows the unmodified model feeds the LLM for this image, in
    order (for LLaVA-NeXT: the base image, then the unpadded sub-image grid row by row with one
    newline row after each grid row).

    Attributes:
        n_before: number of visual positions.
        crop_of: (n_before,) crop of each position, crops numbered in the order the model receives them
            (LLaVA-NeXT: 0 = base image, 1.. = sub-images; InternVL: 0.. = tiles, thumbnail last);
            -1 = a layout-only row (LLaVA-NeXT `image_newline`).
        local_index: (n_before,) raster index of each position inside its crop's full h×w patch grid
            (-1 for layout rows).
        crop_hw: (h, w) patch grid of one crop.
        n_crops: base image + sub-images (1 when there is a single crop / tile and no thumbnail).
        cls_attn: ViT saliency rows, by role ("first", "feature", "score"), each (n_crops, H, h*w): with
            the method's `score="cls"`, the attention the CLS query of that ViT layer pays each patch of
            each crop (CLS column removed); with `score="received"` (the default on towers without a CLS
            token), the attention each patch receives, averaged over all the layer's queries.
        base_region: (h*w,) for each base-image patch, the sub-image (0-based among sub-images, i.e. among
            the crops other than `base_crop`, in crop order) whose region of the original picture contains
            the patch centre; None without sub-images.
        sample: batch row the image belongs to.
        base_crop: index of the base image / thumbnail among the crops (0 for LLaVA-NeXT, the last crop
            for InternVL; 0 when there is only one crop).
        grid_hw: (rows, cols) of the sub-image grid (sub-images in raster order), None without sub-images.
        vit_hidden: (n_crops, h*w, C) feature-layer tokens of each crop in the space where a method may
            form new rows (pre-projector ViT features for LLaVA; the tower's residual stream for
            open_clip; for InternVL the post-shuffle, pre-projector features, (tiles, h'*w', 4C), each
            token the concatenation of its 2×2 source patches), CLS removed, in the crop's raster order
            (`local_index`); filled only when the method's config lists "vit_hidden" in `needs`.
        vit_keys: (n_crops, h*w, Dh) that layer's keys averaged over heads, CLS removed (InternVL:
            (tiles, h'*w', Dh), then averaged over each post-shuffle token's 2×2 source patches); filled
            only when the method's config lists "vit_keys" in `needs`.
    """

    n_before: int
    crop_of: torch.Tensor
    local_index: torch.Tensor
    crop_hw: tuple[int, int]
    n_crops: int
    cls_attn: dict[str, torch.Tensor]
    base_region: torch.Tensor | None = None
    sample: int = 0
    base_crop: int = 0
    grid_hw: tuple[int, int] | None = None
    vit_hidden: torch.Tensor | None = None
    vit_keys: torch.Tensor | None = None

    def crop_positions(self, crop: int) -> torch.Tensor:
        """(n,) ascending positions of crop `crop` (only the patches that survived unpadding)."""
        return (self.crop_of == crop).nonzero(as_tuple=True)[0]

    def sub_crops(self) -> list[int]:
        """Crop indices of the sub-images, in crop order (every crop except `base_crop`)."""
        return [c for c in range(self.n_crops) if c != self.base_crop] if self.n_crops > 1 else []

    def crop_sizes(self) -> list[int]:
        """Positions per crop, in crop order."""
        counts = torch.bincount(self.crop_of[self.crop_of >= 0], minlength=self.n_crops)
        return [int(c) for c in counts.tolist()]

    def layout_positions(self) -> torch.Tensor:
        """(n,) ascending positions of layout-only rows (newlines)."""
        return (self.crop_of < 0).nonzero(as_tuple=True)[0]


@dataclass
class Selection:
    """A vision-stage method's answer for one image.

    Attributes:
        kept_indices: (n_kept,) ascending positions into the image's `n_before` rows.
        crop_budgets: tokens allotted to each crop, in crop order (`ImageTokens.crop_of`).
        crop_kept: tokens actually kept in each crop (equal to the budgets for every built-in method).
        new_rows: (n_new, C) rows that are no original position (merged or pooled tokens), in the space
            of `ImageTokens.vit_hidden`; the adapter maps them to the LLM's space (LLaVA: its own
            projector) and places them after the kept rows, in this order.  None = no new rows.
        new_groups: n_new LongTensors, the positions (into `n_before`) each new row summarises.

    The rows the language model receives for the image are `len(kept_indices) + n_new`; that total is
    what the budget counts.
    """

    kept_indices: torch.Tensor
    crop_budgets: list[int]
    crop_kept: list[int]
    new_rows: torch.Tensor | None = None
    new_groups: list[torch.Tensor] | None = None

    @property
    def n_new(self) -> int:
        return 0 if self.new_rows is None else int(self.new_rows.shape[0])


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen parameter dataclass.  Subclasses add fields and validation."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "vision"  # "vision" (before the LLM) or "llm" (inside the LLM prefill)
    roles: ClassVar[tuple[str, ...]] = ()  # ViT CLS-attention rows the method needs ("first", "feature")
    logit_roles: ClassVar[tuple[str, ...]] = ()  # of those, roles captured as pre-softmax logits q·k·scale
    needs: ClassVar[tuple[str, ...]] = ()  # extra feature-layer tensors: "vit_hidden", "vit_keys"

    def __post_init__(self) -> None:
        if hasattr(self, "budget"):
            validate_budget(self.budget)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


class VisionMethod:
    """A method that selects visual rows before they reach the language model."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @property
    def score(self) -> str:
        """The saliency its roles are captured as: the config's `score` ("auto", "cls", "received"; see
        `vlmdrop.ops.attention.resolve_score`), "auto" for a method without that option."""
        return getattr(self.config, "score", "auto")

    @property
    def exact_budget(self) -> bool:
        """True when `select` keeps exactly the `n_keep` rows it is asked for (every built-in method
        except compatibility modes that reproduce another code base's counts)."""
        return True

    def vit_layers(self, num_layers: int, feature_layer: int) -> dict[str, int]:
        """Which ViT layers' CLS rows to capture, by role, as non-negative layer indices."""
        return {}

    def n_keep(self, image: ImageTokens) -> int:
        """Rows the language model receives for `image` (kept positions + new rows): the budget."""
        return resolve_budget(self.config.budget, image.n_before)

    def generator(self) -> torch.Generator | None:
        """A freshly seeded generator for one prefill's images (drawn in batch order); None = the
        method draws nothing at random."""
        return None

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        raise NotImplementedError


class LLMMethod:
    """A method that drops image tokens inside the language model's prefill (FastV, PyramidDrop).

    The engine (`vlmdrop.adapters.llm_stage`) asks it where to drop (`drop_layers`), how many tokens
    of an image survive each drop (`n_keep`), and which (`select`); the scores are the attention the
    last prompt token pays each key, averaged over heads, in the layer `score_layer` names.
    """

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @property
    def positions(self) -> str:
        """`"original"` (kept tokens keep their RoPE positions) or `"compact"` (renumbered contiguously)."""
        return getattr(self.config, "positions", "original")

    @property
    def score_layer(self) -> str:
        """Whose attention ranks the drop at layer K: `"previous"` (layer K−1's, as it ran) or
        `"current"` (layer K's own q/k on its input, before the drop)."""
        return getattr(self.config, "score_layer", "previous")

    def drop_layers(self, num_layers: int) -> list[int]:
        """Decoder layers (0-based, ascending) at whose input tokens are removed; validated against
        `num_layers`, with ValueErrors that name the offending value."""
        raise NotImplementedError

    def n_keep(self, stage: int, n_before: int, n_present: int) -> int:
        """Tokens of an image kept at drop `stage` (0-based), out of `n_present` still there; `n_before`
        is the image's token count when it entered the language model."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """Which tokens survive, for every image of the batch at once.

        Args:
            scores: (P,) the present tokens' scores, image after image (each image's ascending).
            lengths: (C,) tokens present per image; ks: (C,) how many each image keeps.

        Returns:
            (sum ks,) indices into `scores`, image by image, ascending within each: the top `ks[c]` of
            image c (ties to the lower index), in one launch (`vlmdrop.kernels.segmented_topk`).
        """
        from . import kernels

        return kernels.segmented_topk(scores, lengths, ks)


@dataclass
class _Registered:
    config: type[MethodConfig]
    method: type  # VisionMethod or LLMMethod subclass
    doc: str = field(default="")
