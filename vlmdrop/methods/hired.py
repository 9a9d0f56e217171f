"""HiRED: High-Resolution Early Dropping (Arif et al., AAAI 2025) as a vision-stage method.

Formulas: `vlmdrop.ops.hired` (paper rule).  Budget semantics: `vlmdrop.ops.budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interface import ImageTokens, MethodConfig, Selection, VisionMethod
from ..ops import hired as F
from ..registry import register_method
from .common import resolve_layer, select_per_crop

MODES = ("paper", "official-code")


@dataclass(frozen=True)
class HiredConfig(MethodConfig):
    """Parameters of HiRED.

    budget: fraction of each image's visual positions to keep (float in (0, 1]) or a count (int >= 1).
    alpha: fraction of the budget given to the base (full) image; the rest goes to sub-images.
    first_layer: ViT layer whose CLS attention splits the budget across sub-images (default 0).
    feature_layer: ViT layer whose CLS attention picks tokens inside each crop; None = the layer whose
        output the LLM receives (the model's `vision_feature_layer`, -2 for LLaVA).
    mode: "paper" (Eq. 1–2 with exact rounding) or "official-code" (the published code's allocation).
    """

    budget: float | int = 0.2
    alpha: float = 0.5
    first_layer: int = 0
    feature_layer: int | None = None
    mode: str = "paper"

    roles = ("first", "feature")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        for name in ("first_layer", "feature_layer"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name}={v!r} must be an int layer index")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid; valid modes: {', '.join(MODES)}")


@register_method("hired", HiredConfig)
class Hired(VisionMethod):
    """HiRED: first-layer CLS attention splits the budget over crops, feature-layer CLS attention picks tokens."""

    config: HiredConfig

    def vit_layers(self, num_layers: int, feature_layer: int) -> dict[str, int]:
        feat = self.config.feature_layer if self.config.feature_layer is not None else feature_layer
        return {
            "first": resolve_layer(self.config.first_layer, num_layers, what="first_layer"),
            "feature": resolve_layer(feat, num_layers, what="feature_layer"),
        }

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        feature = image.cls_attn["feature"].sum(dim=1)  # (n_crops, h*w) summed over heads

        def budgets_for(total: int, caps: list[int]) -> list[int]:
            sub_scores = None
            if image.n_crops > 1:
                base_first = image.cls_attn["first"][0].sum(dim=0)  # (h*w,)
                sub_scores = F.region_scores(base_first, image.base_region, image.n_crops - 1)  # (n_sub,)
            return F.crop_budgets(total, caps, alpha=float(self.config.alpha), sub_scores=sub_scores)

        def pick(crop: int, positions: torch.Tensor, k: int) -> torch.Tensor:
            scores = feature[crop][image.local_index[positions]]  # (n,)
            return positions[F.top_positions(scores, k)]

        return select_per_crop(image, n_keep, budgets_for, pick)
