"""GlobalCom2 (Liu et al., arXiv 2501.05179) as a vision-stage method, for LLaVA-NeXT and InternVL.

The thumbnail (LLaVA-NeXT's base image, InternVL's last tile) guides the compression of the crops:
each crop's retention ratio is set by the thumbnail's score summed over the crop's region (softmax with
temperature, `base · (1 + p_i − mean p)`, clipped to 1), and inside a crop a token's score is its
L2-normalised local score plus the L2-normalised thumbnail score bilinearly resized to the stitched
crop grid.  The score is the official one: the **last** ViT layer's pre-softmax CLS logits q·k·scale,
averaged over heads; with `score="received"` (the default on a tower without CLS, e.g. LLaVA-OneVision's
SigLIP) the attention each patch receives, which is post-softmax (README: "Scores for towers without a CLS
token").  Formulas: `vlmdrop.ops.globalcom2` (with the official-code line references).

vlmdrop's accounting (not the official code's): the image keeps exactly `round(budget · n_before)`
positions; `base` is that fraction of the crop positions, the thumbnail's ratio is `base`, and the
whole-number shares come from `crop_keep_counts(..., total=...)` (largest remainder, capped).  The
crop → thumbnail region map is the 2-D one of `ImageTokens.base_region` (unpad-aware for LLaVA-NeXT;
the official code cuts the thumbnail grid into equal blocks); kept thumbnail tokens stay in the
model's order (the official code feeds them by descending score); LLaVA-NeXT newline rows are kept
only on overflow, like every method here.  A single crop (LLaVA-1.5, a one-tile InternVL image)
keeps its top tokens by the score.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..interface import ImageTokens, MethodConfig, Selection, VisionMethod
from ..ops import globalcom2 as G
from ..ops.attention import SCORES
from ..registry import register_method
from .common import resolve_layer, select_top_per_crop


@dataclass(frozen=True)
class GlobalCom2Config(MethodConfig):
    """Parameters of GlobalCom2.

    budget: fraction of each image's visual positions to keep (float in (0, 1]) or a count (int >= 1);
        the official default retention ratio is 0.25.
    temperature: softmax temperature of the crop retention (official default 10.0).
    score_layer: ViT layer whose pre-softmax CLS logits (mean over heads) score tokens; -1 (the last
        layer) as in the official code.
    score: the ViT saliency used wherever the method reads the CLS row: "cls" (the CLS query's
        attention row), "received" (the attention each patch receives, averaged over all queries; the
        rule for towers without a CLS token, e.g. SigLIP), or "auto" (default: "cls" when the tower has a
        CLS token, "received" otherwise).  README: "Scores for towers without a CLS token".
    """

    budget_field = "budget"  # the parameter a budget sets (vlmdrop.eval.params.method_params)
    budget: float | int = 0.25
    temperature: float = G.TEMPERATURE
    score_layer: int = -1
    score: str = "auto"

    roles = ("score",)
    logit_roles = ("score",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not valid; valid scores: {', '.join(SCORES)}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf") or t > sys.float_info.max:
            raise ValueError(f"temperature={t!r} must be a finite number > 0")  # (an int beyond float range too)
        if isinstance(self.score_layer, bool) or not isinstance(self.score_layer, int):
            raise ValueError(f"score_layer={self.score_layer!r} must be an int layer index")


@register_method("globalcom2", GlobalCom2Config)
class GlobalCom2(VisionMethod):
    """GlobalCom2: thumbnail-guided crop retention, local + global token scores inside each crop."""

    config: GlobalCom2Config

    def vit_layers(self, num_layers: int, feature_layer: int) -> dict[str, int]:
        return {"score": resolve_layer(self.config.score_layer, num_layers, what="score_layer")}

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        score = image.cls_attn["score"].float().mean(dim=1)  # (n_crops, h*w) pre-softmax logits, mean over heads
        h, w = image.crop_hw
        base, subs = image.base_crop, image.sub_crops()
        thumb = score[base]  # (h*w,) the thumbnail's score on its grid
        boxes = _crop_boxes(image) if subs else {}

        def budgets_for(total: int, caps: list[int]) -> list[int]:
            if not subs:
                return [total]
            ratio = total / max(sum(caps), 1)  # the budget's fraction of the crop positions
            sub_ratio = G.crop_retention(thumb, image.base_region, len(subs), base_ratio=ratio,
                                         temperature=float(self.config.temperature))  # (n_sub,)
            ratios = [0.0] * image.n_crops
            ratios[base] = ratio
            for j, c in enumerate(subs):
                ratios[c] = float(sub_ratio[j])
            return G.crop_keep_counts(caps, ratios, total=total)

        # every position's score: the thumbnail's own on its crop, local + interpolated global on each sub-image
        local_all = image.local_index.to(score.device)  # (n_before,)
        scores = torch.zeros(image.n_before, dtype=torch.float32, device=score.device)  # layout rows: ignored
        on_base = (image.crop_of == base).nonzero(as_tuple=True)[0].to(score.device)  # (n_base,)
        scores[on_base] = thumb[local_all[on_base]]
        for crop in subs:  # each sub-image's global scores are its own box of the thumbnail, interpolated
            positions = image.crop_positions(crop).to(score.device)  # (n,) ascending
            if positions.numel() == 0:  # unpadded to nothing (extreme aspect ratios): no token to score
                continue
            local = local_all[positions]  # (n,) raster index inside the crop
            order = torch.argsort(local)  # raster order inside the crop
            full_hw, rows, cols = boxes[crop]
            s = G.crop_token_scores(score[crop][local[order]], thumb.reshape(h, w), full_hw=full_hw,
                                    crop_rows=rows, crop_cols=cols)  # (n,) raster order
            scores[positions[order]] = s.float()
        return select_top_per_crop(image, n_keep, budgets_for, scores)



def _crop_boxes(image: ImageTokens) -> dict[int, tuple[tuple[int, int], tuple[int, int] | torch.Tensor,
                                                       tuple[int, int] | torch.Tensor]]:
    """`G.stitched_crop_grids` of the image's sub-images (the stitched rows and columns each one's tokens
    sit on: a rectangle, or LLaVA-OneVision's anchor sub-grid), keyed by crop id."""
    if image.grid_hw is None:
        raise ValueError(f"an image with {image.n_crops} crops needs its sub-image grid (ImageTokens.grid_hw)")
    subs = image.sub_crops()
    local = [image.local_index[image.crop_positions(c)] for c in subs]  # (n_j,) raster index inside crop c
    grids = G.stitched_crop_grids(local, crop_hw=image.crop_hw, grid_hw=image.grid_hw)
    return {subs[j]: (full, _as_span(rows), _as_span(cols)) for j, (full, rows, cols) in grids.items()}


def _as_span(idx: torch.Tensor) -> tuple[int, int] | torch.Tensor:
    """Consecutive indices as the [start, stop) box `G.stitched_crop_boxes` gives; others as they are."""
    a, b = int(idx[0]), int(idx[-1]) + 1
    return (a, b) if idx.numel() == b - a else idx
