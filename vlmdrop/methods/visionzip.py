"""VisionZip (Yang et al., 2024) as a vision-stage method: dominant tokens + merged contextual tokens.

Formulas: `vlmdrop.ops.visionzip` (the official algorithm on one crop).  Budget semantics:
`vlmdrop.ops.budget`; accounting per crop as in `methods.common.select_per_crop`.

For each crop (LLaVA-1.5: the image; LLaVA-NeXT: the base image and every sub-image; InternVL: every
tile, thumbnail last, on its post-shuffle grid) the crop's share `k` of the budget is split by
`ops.visionzip.split_budget(k, ratio)` into `d` dominant tokens (top CLS attention of the feature
layer, summed over heads) and `c` contextual tokens (the remaining tokens merged by key similarity
into `c` evenly spaced targets).  Only the positions that reach the language model are candidates
(LLaVA-NeXT's unpadded patches).  A crop whose share covers it entirely is kept as it is, so
`budget=1.0` is the identity.

Output, per image: the dominant positions of every crop (and layout rows on overflow) in their
original order, then the contextual tokens crop by crop (base image first), each crop's in target
order -- the official order [dominant, contextual] without the CLS token, which Hugging Face's
"default" feature strategy never passes to the LLM.  `kept_indices` are the dominant positions;
`n_new` counts the contextual rows; `new_groups[j]` lists the positions merged into contextual row j
(its target first).  Contextual rows are formed from the pre-projector features and then mapped by
the model's own projector, as in the official code.

With the paper's ratio 5.4, budget=64 on LLaVA-1.5 gives 54 dominant patches + 10 contextual tokens.
(The official `visionzip(model, 54, 10)` feeds CLS + 53 patches + 10; its CLS row is not available in
the Hugging Face models, so the 64 rows here are all patch-derived.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..interface import ImageTokens, MethodConfig, Selection, VisionMethod
from ..ops.attention import SCORES
from ..ops.visionzip import PAPER_RATIO, split_budget, visionzip_select
from ..registry import register_method
from .common import reduce_per_crop, resolve_layer


@dataclass(frozen=True)
class VisionZipConfig(MethodConfig):
    """Parameters of VisionZip.

    budget: fraction (float in (0, 1]) or count (int >= 1) of each image's visual positions to hand to
        the LLM, dominant and contextual tokens together.
    ratio: dominant : contextual tokens of each crop's share (default 5.4 = the paper's 54 : 10).
    score: the ViT saliency used wherever the method reads the CLS row: "cls" (the CLS query's
        attention row), "received" (the attention each patch receives, averaged over all queries; the
        rule for towers without a CLS token, e.g. SigLIP), or "auto" (default: "cls" when the tower has a
        CLS token, "received" otherwise).  README: "Scores for towers without a CLS token".
    """

    budget_field = "budget"  # the parameter a budget sets (vlmdrop.eval.params.method_params)
    budget: float | int = 0.2
    ratio: float = PAPER_RATIO
    score: str = "auto"

    roles = ("feature",)
    needs = ("vit_hidden", "vit_keys")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not valid; valid scores: {', '.join(SCORES)}")
        r = self.ratio
        if (isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r < float("inf"))
                or r > sys.float_info.max):  # an int beyond float range would overflow float(ratio) at prefill
            raise ValueError(f"ratio={r!r} must be a finite number > 0 (dominant : contextual, e.g. 5.4 = 54 : 10)")


@register_method("visionzip", VisionZipConfig)
class VisionZip(VisionMethod):
    """Dominant tokens by feature-layer CLS attention + contextual tokens merged by key similarity."""

    config: VisionZipConfig

    def vit_layers(self, num_layers: int, feature_layer: int) -> dict[str, int]:
        return {"feature": resolve_layer(feature_layer, num_layers, what="feature_layer")}

    def select(self, image: ImageTokens, n_keep: int, *, generator: torch.Generator | None = None) -> Selection:
        if image.vit_hidden is None or image.vit_keys is None:
            raise ValueError("visionzip needs the feature layer's hidden states and keys; "
                             "this adapter did not provide them")
        feature = image.cls_attn["feature"]  # (n_crops, H, h*w)

        def reduce(crop: int, positions: torch.Tensor, k: int):
            dominant, contextual = split_budget(k, ratio=float(self.config.ratio))
            local = image.local_index[positions]  # (n,) raster index in the crop's h*w grid
            dev = image.vit_hidden.device
            r = visionzip_select(feature[crop][:, local].to(dev),  # (H, n)
                                 image.vit_keys[crop][local.to(dev)],  # (n, Dh)
                                 image.vit_hidden[crop][local.to(dev)],  # (n, C)
                                 dominant=dominant, contextual=contextual)
            if not contextual:
                return positions[r.dominant_idx.cpu()], None, []
            return (positions[r.dominant_idx.cpu()], r.contextual_tokens,  # (contextual, C)
                    [positions[g.cpu()] for g in r.groups])

        return reduce_per_crop(image, n_keep, reduce)
