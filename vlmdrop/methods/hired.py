"""HiRED: High-Resolution Early Dropping (Arif et al., AAAI 2025) as a vision-stage method.

Formulas: `vlmdrop.ops.hired` (paper rule).  Budget semantics: `vlmdrop.ops.budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interface import ImageTokens, MethodConfig, Selection, VisionMethod
from ..ops import hired as F
from ..ops import hired_official as OF
from ..ops.attention import SCORES
from ..registry import register_method
from .common import resolve_layer, select_top_per_crop

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
    score: the ViT saliency used wherever the method reads the CLS row: "cls" (the CLS query's
        attention row), "received" (the attention each patch receives, averaged over all queries; the
        rule for towers without a CLS token, e.g. SigLIP), or "auto" (default: "cls" when the tower has a
        CLS token, "received" otherwise).  README: "Scores for towers without a CLS token".
    """

    budget_field = "budget"  # the parameter a budget sets (vlmdrop.eval.params.method_params)
    budget: float | int = 0.2
    alpha: float = 0.5
    first_layer: int = 0
    feature_layer: int | None = None
    mode: str = "paper"
    score: str = "auto"

    roles = ("first", "feature")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        for name in ("first_layer", "feature_layer"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name}={v!r} must be an int layer index")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not valid; valid scores: {', '.join(SCORES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid; valid modes: {', '.join(MODES)}")
        if self.mode == "official-code" and not isinstance(self.budget, float):
            raise ValueError(f"budget={self.budget!r}: mode='official-code' takes a float rate, "
                             "as the official code does")


@register_method("hired", HiredConfig)
class Hired(VisionMethod):
    """HiRED: first-layer CLS attention splits the budget over crops, feature-layer CLS attention picks tokens."""

    config: HiredConfig

    @property
    def exact_budget(self) -> bool:
        return self.config.mode == "paper"

    def vit_layers(self, num_layers: int, feature_layer: int) -> dict[str, int]:
        feat = self.config.feature_layer if self.config.feature_layer is not None else feature_layer
        return {
            "first": resolve_layer(self.config.first_layer, num_layers, what="first_layer"),
            "feature": resolve_layer(feat, num_layers, what="feature_layer"),
        }

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        feature = image.cls_attn["feature"].sum(dim=1)  # (n_crops, h*w) summed over heads
        if self.config.mode == "official-code":
            return self._official(image, feature)

        def budgets_for(total: int, caps: list[int]) -> list[int]:
            sub_scores = None
            order = [image.base_crop] + image.sub_crops()  # base first, as F.crop_budgets expects
            if image.n_crops > 1:
                base_first = image.cls_attn["first"][image.base_crop].sum(dim=0)  # (h*w,)
                sub_scores = F.region_scores(base_first, image.base_region, image.n_crops - 1)  # (n_sub,)
            shares = F.crop_budgets(total, [caps[c] for c in order], alpha=float(self.config.alpha),
                                    sub_scores=sub_scores)
            out = [0] * len(caps)
            for c, k in zip(order, shares):
                out[c] = k
            return out  # crop order

        crop = image.crop_of.clamp(min=0).to(feature.device)  # (n_before,); layout rows read crop 0, ignored
        local = image.local_index.clamp(min=0).to(feature.device)  # (n_before,)
        return select_top_per_crop(image, n_keep, budgets_for, feature[crop, local])  # scores (n_before,)

    def _official(self, image: ImageTokens, feature: torch.Tensor) -> Selection:
        """The published code's rule (see `vlmdrop.ops.hired_official`): budget over padded crops,
        count-based row-band shares, floors, no newline rows, tokens chosen in padding discarded.

        At rate 1.0 the official code does not run HiRED at all (`token_budget_rate < 1.0` guards it,
        MLN L989; an all-ones mask otherwise): every crop keeps all its unpadded tokens, budget N per
        crop, still without newline rows.  On LLaVA-1.5 the official code scores the whole batch
        with image 0's CLS attention and applies that one mask to every image (its ML L347, L547);
        here each image uses its own (the same at batch size 1)."""
        if image.n_crops > 1 and image.base_crop != 0:
            raise ValueError(f"mode='official-code' reproduces the LLaVA code base (base image first); this image's "
                             f"base crop is {image.base_crop} of {image.n_crops} (InternVL): use mode='paper'")
        h, w = image.crop_hw
        n, rate, alpha = h * w, float(self.config.budget), float(self.config.alpha)
        if rate >= 1.0:  # the official code skips HiRED (an all-ones mask): every unpadded token, no newline
            budgets = [n] * image.n_crops
        elif image.n_crops == 1:  # LLaVA-1.5's code path: top int(N * rate), no alpha
            budgets = [min(n, int(n * rate))]
        else:
            total = OF.official_total_budget(image.n_crops, tokens_per_crop=n, rate=rate)
            base_first = image.cls_attn["first"][0].sum(dim=0)  # (h*w,)
            budgets = OF.official_crop_budgets(base_first, n_sub=image.n_crops - 1, total_budget=total, alpha=alpha)
        chosen_local = OF.official_select(feature, budgets)  # per crop, indices into the padded h*w grid
        kept, crop_kept = [], []
        for crop, local in enumerate(chosen_local):
            positions = image.crop_positions(crop)  # (n,) unpadded positions of this crop
            hit = torch.isin(image.local_index[positions], local)  # (n,) chosen and not unpadded away
            kept.append(positions[hit])
            crop_kept.append(int(hit.sum()))
        return Selection(kept_indices=torch.cat(kept).sort().values, crop_budgets=budgets, crop_kept=crop_kept)
