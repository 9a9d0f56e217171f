"""VisionZip: dominant tokens by CLS attention + contextual tokens merged by key similarity.

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(arXiv 2412.04467), Sec. 3 (dominant token selection, contextual token merging).
Official code: dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02
  - visionzip/clip_encoder.py L42-83  (the algorithm, CLIPVisionTower_VisionZip.forward)
  - visionzip/utils.py L21-24, L89    (the "metric" = layer keys averaged over heads)
  - visionzip/utils.py L186-197       (metric kept only at layer index 22, i.e. layers[-2])
  - visionzip/main.py L5-7            (`dominant` counts the CLS token: dominant_num = dominant - 1)

What the official code does, for one image (CLIP-L/14-336, 1 CLS + 576 patches):
  scores : attentions[-2] (layer -2, softmax over all 577 keys), CLS row, patch columns,
           **summed over heads** (clip_encoder.py L51-52).
  keys   : that same layer's k_proj output (bias included), split into heads and **averaged over
           heads** -> (N, head_dim) (utils.py L23-24, L89); L2-normalised, no epsilon (L64).
  hidden : hidden_states[-2], the output of that layer (the features the LLM receives).
  dominant: CLS + the top-(dominant-1) patches by score, kept in ascending index order
           (boolean-mask selection, L53-57). The CLS token *is* passed to the LLM.
  contextual: the n_rest patches left (ascending index order, L60-62);
           step = max(1, n_rest // contextual); targets = rest[0::step][:contextual] (L67-68);
           every other remaining token goes to the target with the highest cosine similarity
           of normalised keys (argmax: first maximum on ties, L72-74);
           contextual_k = hidden[target_k] + mean(hidden of tokens assigned to k)  (L75-80)
           -- the target is *added* to the mean of its group (weight 1 each, not an average over
           the group); with nobody assigned the token is the target itself.

This module works on patch tokens only (CLS row/column already removed). To reproduce the
official LLaVA output for `visionzip(model, dominant=d, contextual=c)`, call
`visionzip_select(..., dominant=d - 1, contextual=c)` and put the CLS token's hidden state in
front of the dominant tokens; the official order is [CLS, dominant (ascending), contextual].

LLaVA-NeXT in the official code (visionzip/llava_arch.py L42-80, L105-121): every crop (base and
sub-images) gets the same (dominant, contextual) split. The base image contributes
[CLS, dominant, contextual] as above; the sub-images' dominant patches are laid out on the
stitched crop grid and read in its raster order (no unpadding, no newline tokens), followed by
every sub-image's CLS token and then every sub-image's contextual tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

PAPER_RATIO = 5.4  # dominant : contextual = 54:10 = 108:20 = 162:30 (VisionZip, Tab. 1)


class VisionZipResult(NamedTuple):
    dominant_idx: Tensor  # (dominant,) long, ascending patch indices kept as they are
    contextual_tokens: Tensor  # (contextual, C) merged tokens, in target order
    target_idx: Tensor  # (contextual,) long, ascending patch index of each contextual token's target
    groups: list[Tensor]  # contextual x (m_k,) long: [target, merged tokens ascending...]


def split_budget(budget: int, *, ratio: float = PAPER_RATIO) -> tuple[int, int]:
    """Split a token budget into (dominant, contextual) with dominant / contextual ≈ ratio.

    contextual = floor(budget / (1 + ratio) + 0.5), dominant = budget - contextual. With the
    paper's ratio 5.4 this gives 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30), i.e.
    contextual = budget * 10 / 64. Note that the official code counts the CLS token among the
    dominant tokens (see the module docstring).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    contextual = int(math.floor(budget / (1.0 + ratio) + 0.5))
    return budget - contextual, contextual


def visionzip_select(
    cls_attn: Tensor, keys: Tensor, hidden: Tensor, *, dominant: int, contextual: int
) -> VisionZipResult:
    """Dominant top-k by CLS attention, then merge the rest into `contextual` evenly spaced targets.

    cls_attn: (H, N) per-head CLS attention over the N patches (summed over heads here), or (N,)
        already reduced.
    keys: (H, N, Dh) per-head keys of the same layer (averaged over heads here, as the official
        code does) or (N, D) already reduced. Not the concatenated (N, H*Dh) keys.
    hidden: (N, C) the features to keep/merge.
    dominant, contextual: counts; dominant + contextual <= N. contextual == 0 gives plain top-k.
    """
    if cls_attn.dim() == 2:
        scores = cls_attn.sum(dim=0)  # (N,)
    elif cls_attn.dim() == 1:
        scores = cls_attn
    else:
        raise ValueError(f"cls_attn must be (H, N) or (N,), got shape {tuple(cls_attn.shape)}")
    if keys.dim() == 3:
        keys = keys.mean(dim=0)  # (N, Dh)
    elif keys.dim() != 2:
        raise ValueError(f"keys must be (H, N, Dh) or (N, D), got shape {tuple(keys.shape)}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, C), got shape {tuple(hidden.shape)}")
    n = scores.shape[0]
    if keys.shape[0] != n or hidden.shape[0] != n:
        raise ValueError(f"token counts differ: cls_attn {n}, keys {keys.shape[0]}, hidden {hidden.shape[0]}")
    if dominant < 0 or contextual < 0 or dominant + contextual > n:
        raise ValueError(f"need 0 <= dominant, contextual and dominant + contextual <= N={n}; "
                         f"got dominant={dominant}, contextual={contextual}")

    device = scores.device
    is_dom = torch.zeros(n, dtype=torch.bool, device=device)  # (N,)
    is_dom[scores.topk(dominant, largest=True).indices] = True
    dominant_idx = is_dom.nonzero().squeeze(1)  # (dominant,) ascending
    if contextual == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return VisionZipResult(dominant_idx, hidden.new_zeros(0, hidden.shape[1]), empty, [])

    rest = (~is_dom).nonzero().squeeze(1)  # (n_rest,) ascending patch indices
    n_rest = rest.shape[0]
    step = max(1, n_rest // contextual)
    is_target = torch.zeros(n_rest, dtype=torch.bool, device=device)  # (n_rest,)
    is_target[torch.arange(0, n_rest, step, device=device)[:contextual]] = True
    target_idx = rest[is_target]  # (contextual,)
    merge_idx = rest[~is_target]  # (n_rest - contextual,)

    k = keys[rest]  # (n_rest, D)
    k = k / k.norm(dim=-1, keepdim=True)  # (n_rest, D), no epsilon, as in the official code
    sim = k[~is_target] @ k[is_target].T  # (n_merge, contextual) cosine similarity
    assign = sim.argmax(dim=1)  # (n_merge,) first maximum wins on ties
    counts = torch.bincount(assign, minlength=contextual).clamp(min=1)  # (contextual,)
    summed = hidden.new_zeros(contextual, hidden.shape[1]).index_add_(0, assign, hidden[merge_idx])  # (contextual, C)
    contextual_tokens = hidden[target_idx] + summed / counts.unsqueeze(1).to(hidden.dtype)  # (contextual, C)

    groups = [torch.cat([target_idx[j : j + 1], merge_idx[assign == j]]) for j in range(contextual)]
    return VisionZipResult(dominant_idx, contextual_tokens, target_idx, groups)
