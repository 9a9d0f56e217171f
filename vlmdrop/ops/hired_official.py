"""HiRED as the *official code* does it (compatibility mode), not as the paper describes it.

Reference: hasanar1f/HiRED @ 502d6dd79a03e87cc808cedba8b8a951d93cb62b,
file transformers/src/transformers/models/llava_next/modeling_llava_next.py (called "MLN" below):
  - ViT_Attn_Hook.get_attn                       MLN L77-96   (CLS attention from hooked q/k)
  - LlavaNextForConditionalGeneration.forward    MLN L959-1017 (layers 0 and 22, 16 heads, no newline)
  - HiRED_token_selection                         MLN L518-559 (total / base / sub-image budgets)
  - HiRED_sub_img_budgets                         MLN L490-516 (count-based shares, row bands, floor)
  - pack_HiRED_image_features                     MLN L782-862 (masking, unpad, no newline tokens)
and, for LLaVA-1.5, transformers/src/transformers/models/llava/modeling_llava.py ("ML"):
  - LlavaForConditionalGeneration.HiRED_token_selection  ML L340-354 (top int(N * rate), no alpha)
  - LlavaForConditionalGeneration.forward                ML L505-551 (layer 22; the mask at L547)

What the official code does around these functions (reproduced by `vlmdrop.methods.hired`):
  - rate >= 1.0: HiRED is skipped (MLN L989, ML L533) and an all-ones mask is used, so every
    unpadded token is kept; on LLaVA-NeXT still without newline tokens (MLN L1011).
  - packing (MLN L782-862): the per-crop boolean masks are stitched and unpadded exactly like the
    features, so a token chosen in a padded area of a sub-image is removed after the choice
    (an image keeps fewer than its budget); no `image_newline` is inserted.
  - LLaVA-1.5 batches (ML L347, L547): the CLS row is taken from image 0 of the batch
    (`bottom_layer_attn[0, ...]`) and the one resulting mask is applied to every image, so all images
    of a batch keep image 0's token positions. vlmdrop's compatibility mode scores each image with its
    own attention (identical at batch size 1, which the published benchmark scripts use:
    `--batch_size 1` in accuracy_benchmarks/llava_1.5_7b.sh).
    The LLaVA-NeXT path selects per image (MLN L534-558).

Paper (arXiv 2408.10945, Eq. 1-2, Alg. 1) vs official code, in short:
  paper: sub-image share ~ sum of first-layer CLS attention over the base-image tokens inside the
         sub-image's 2-D region; shares rounded; selection by the final layer's CLS attention.
  code:  share ~ how many of the base image's top int(N*(1-alpha)) first-layer tokens fall into the
         sub-image's *raster row band* of the base grid (band i = base tokens i*N/n .. (i+1)*N/n - 1);
         every share floored and capped at N; remainders are lost, never redistributed.

Inputs here are the per-crop CLS-attention rows the official code uses: softmax over all 1+N keys
of layer `l`, row 0 (CLS), columns 1.. (patches), summed over heads. The official code uses
layer 0 for the budget split and layer 22 (of CLIP-L's 24; = the layer whose output the LLM
receives with vision_feature_layer=-2) for the selection.
"""

from __future__ import annotations

import torch
from torch import Tensor


def official_total_budget(n_crops: int, *, tokens_per_crop: int, rate: float) -> int:
    """B = int(n_crops * N * rate), MLN L538. n_crops counts the base image (1 + n_sub).

    The budget is taken over the padded crops (n_crops * N tokens, before unpadding and without
    newline tokens), so it is not a fraction of the tokens LLaVA-NeXT would actually feed.
    """
    if n_crops < 1 or tokens_per_crop < 1:
        raise ValueError(f"need n_crops >= 1 and tokens_per_crop >= 1, got {n_crops}, {tokens_per_crop}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return int(n_crops * tokens_per_crop * rate)  # same left-to-right float order as MLN L538


def official_crop_budgets(
    first_layer_cls_attn_base: Tensor, *, n_sub: int, total_budget: int, alpha: float
) -> list[int]:
    """Per-crop token budgets of the official HiRED code, base image first, then sub-images.

    first_layer_cls_attn_base: (N,) layer-0 CLS attention of the base image, summed over heads.
    n_sub: number of sub-images (crops after the base image), raster order over the crop grid.
    total_budget: B, see `official_total_budget`.
    alpha: share of B for the base image (official default 0.5 in its scripts; 1.0 if the key is
        missing from hired_config, MLN L964).

    Official behaviour reproduced (MLN L538-552, L490-516):
      base  = min(int(B * alpha), N)
      sub   = min(B - base, n_sub * N)
      top   = the int(N * (1 - alpha)) base tokens with the largest layer-0 CLS attention
              (note: this count depends on alpha only, not on the budget rate)
      c_i   = |top ∩ band_i|, band_i = base tokens [i*N/n_sub, (i+1)*N/n_sub) in raster order,
              i.e. horizontal row bands of the base grid, not the sub-image's 2-D quadrant
      b_i   = min(trunc(float32(c_i / sum c) * sub), N)     (float32 as in torch's int/int division)
    Departures from the paper: counts instead of attention mass, row bands instead of 2-D
    regions, floor instead of rounding (sum b_i <= sub; the remainder is lost), cap at N without
    redistribution. Ties in the layer-0 top-k are resolved by torch.topk (unspecified order).

    When sub = 0 the official code skips the sub-image step, so `[base, 0, ..., 0]` is returned
    for any N and n_sub. Raises ValueError where the official code would crash or produce garbage
    with sub > 0: N not divisible by n_sub (its reshape fails), or an empty `top` set (its 0/0
    gives NaN).
    """
    if first_layer_cls_attn_base.dim() != 1:
        raise ValueError(f"first_layer_cls_attn_base must be (N,), got shape {tuple(first_layer_cls_attn_base.shape)}")
    n = first_layer_cls_attn_base.shape[0]
    if n_sub < 1:
        raise ValueError(f"n_sub must be >= 1, got {n_sub}")
    if total_budget < 0:
        raise ValueError(f"total_budget must be >= 0, got {total_budget}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    base = min(int(total_budget * alpha), n)
    sub = min(total_budget - base, n_sub * n)
    if sub <= 0:  # the official code never calls HiRED_sub_img_budgets then (MLN L549)
        return [base] + [0] * n_sub
    if n % n_sub != 0:
        raise ValueError(f"official HiRED splits the base grid into {n_sub} equal raster bands; N={n} is not "
                         f"divisible (sub-image budget {sub})")
    n_top = int(n * (1 - alpha))
    if n_top == 0:
        raise ValueError(f"alpha={alpha} leaves int(N*(1-alpha))=0 first-layer tokens to count, but the "
                         f"sub-image budget is {sub}; the official code divides 0 by 0 here")

    top = torch.zeros(n, dtype=torch.bool, device=first_layer_cls_attn_base.device)  # (N,)
    top[first_layer_cls_attn_base.topk(n_top, largest=True).indices] = True
    counts = top.view(n_sub, n // n_sub).sum(dim=-1)  # (n_sub,) int64, one row band per sub-image
    share = counts.to(torch.float32) / counts.sum().to(torch.float32)  # (n_sub,)
    budgets = (share * sub).int().clamp(max=n)  # (n_sub,) truncation toward zero
    return [base] + budgets.tolist()


def official_select(feature_layer_cls_attn: Tensor, budgets: list[int]) -> list[Tensor]:
    """Per-crop kept token indices: top-b_i by the feature layer's CLS attention (MLN L547, L555-556).

    feature_layer_cls_attn: (n_crops, N) layer-22 CLS attention summed over heads, base first.
    budgets: n_crops ints from `official_crop_budgets`.
    Returns n_crops LongTensors (b_i,), ascending (the official code builds a boolean mask, so the
    kept tokens keep their raster order). This is the same rule as the paper's in-partition
    selection; what differs afterwards (unpadding of the sub-image mask, no newline tokens) is
    the packing step (MLN L782-862), described in the module docstring.
    """
    if feature_layer_cls_attn.dim() != 2:
        raise ValueError(f"feature_layer_cls_attn must be (n_crops, N), "
                         f"got shape {tuple(feature_layer_cls_attn.shape)}")
    n_crops, n = feature_layer_cls_attn.shape
    if len(budgets) != n_crops:
        raise ValueError(f"got {len(budgets)} budgets for {n_crops} crops")
    bad = [b for b in budgets if not 0 <= b <= n]
    if bad:
        raise ValueError(f"budgets must lie in [0, {n}], got {bad}")
    kept = []
    for scores, b in zip(feature_layer_cls_attn, budgets):
        idx = scores.topk(b, largest=True).indices  # (b,)
        kept.append(idx.sort().values)
    return kept
