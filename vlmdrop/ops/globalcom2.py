"""GlobalCom2: thumbnail-guided per-crop retention and global+local token scores (LLaVA-NeXT).

Paper: Liu et al., "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs
Acceleration" (GlobalCom2, arXiv 2501.05179), Sec. 3.
Official code: xuyang-liu16/GlobalCom2 @ 96b2d00b86a22495285ab448cc89faedafddd78d
  - llava/model/llava_arch.py ("LA") L101-135  generate_scale_for_crop_features (retention ratios)
  - LA L197-236  interpolate_and_split_cls_attn_scores (global scores per crop)
  - LA L239-268  select_topk_crop_features (normalise, add, top-k per crop)
  - LA L285-295  compress_thumbnail; LA L297-387 compress_crops; LA L403-444 call site
  - llava/model/multimodal_encoder/apply_customvit.py ("AC") L44-48, L99 (the scores)

The score the official code calls "CLS attention" (AC L44-48, LA L403) is, for every crop and the
thumbnail: the **last** ViT layer's (attn_maps[-1]) scaled dot products q.k/sqrt(d) **before
softmax**, **averaged over heads**, CLS row, patch columns. All functions below expect that score
where they say "cls_attn"; feeding post-softmax sums instead changes the softmax in
`crop_retention` (the temperature acts on the raw sums).

Defaults (LA L101, L103): retention ratio 0.25 for the thumbnail and as `base_ratio` for the
crops, temperature 10.0.

Official-code details not reproduced here (they belong to the model glue; listed for the adapter):
  - thumbnail: keeps int(N * 0.25) tokens by that score, fed in *descending score order* (LA L291-293);
  - crops: the top-k indices index the crop's unpadded token list but are written back as if they
    were positions in the full 24x24 crop grid (LA L247, L358-361), so for crops that contain
    padding the kept features land at shifted grid positions;
  - newline: one per row of the *padded* stitched grid, all kept (LA L372-383);
  - batch: the scores of every crop of every image are one concatenated tensor (LA L403, thumbnails
    included); the loop over images reads the thumbnail score as its row 0 (LA L418), then drops one
    row (LA L430, `cls_attn_scores = cls_attn_scores[1:]`), and compress_crops reads the crops' local
    scores as the first n_sub rows of what is left (LA L332). So image j of the batch (0-based, every
    image multi-crop) scores its thumbnail, and derives its crop retention ratios (LA L425), from row
    j of the concatenated scores, and its crops from rows j+1 .. j+n_sub_j; these are its own rows
    only for j = 0 (for j >= 1, row j is in general a sub-image of image 0). The features are each
    image's own; only the scores are shifted. Correct at batch size 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .budget import largest_remainder

RETENTION_RATIO = 0.25  # LA L101
TEMPERATURE = 10.0  # LA L103


def official_region_map(h: int, w: int, *, n_rows: int, n_cols: int) -> Tensor:
    """Crop index (raster over the crop grid) of each thumbnail token, as LA L105-120 assigns it.

    The thumbnail grid is cut into n_rows x n_cols blocks of (h // n_rows) x (w // n_cols) tokens
    (at least 1); leftover rows/columns go to the last block row/column. Returns (h, w) long.
    """
    if min(h, w, n_rows, n_cols) < 1:
        raise ValueError(f"need positive sizes, got h={h}, w={w}, n_rows={n_rows}, n_cols={n_cols}")
    ph, pw = max(h // n_rows, 1), max(w // n_cols, 1)
    ri = (torch.arange(h) // ph).clamp(max=n_rows - 1)  # (h,)
    ci = (torch.arange(w) // pw).clamp(max=n_cols - 1)  # (w,)
    return ri.unsqueeze(1) * n_cols + ci.unsqueeze(0)  # (h, w)


def crop_retention(
    thumb_cls_attn: Tensor,
    region_of_crop: Tensor,
    n_crops: int,
    *,
    base_ratio: float = RETENTION_RATIO,
    temperature: float = TEMPERATURE,
) -> Tensor:
    """Per-crop retention ratios (LA L103-135), float64 (n_crops,).

    s_i = sum of thumb_cls_attn over the thumbnail tokens with region_of_crop == i (0 if none)
    p   = exp((s - max s) / T) / (sum exp(...) + 1e-8)        (softmax with temperature T)
    r_i = min(base_ratio * (1 + p_i - mean(p)), 1)           (clipped above only)
    Since mean(p) ~ 1/n, the ratios average to ~base_ratio unless the clip bites.
    """
    if thumb_cls_attn.shape != region_of_crop.shape:
        raise ValueError(f"thumb_cls_attn {tuple(thumb_cls_attn.shape)} and region_of_crop "
                         f"{tuple(region_of_crop.shape)} must have the same shape")
    if n_crops < 1:
        raise ValueError(f"n_crops must be >= 1, got {n_crops}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= base_ratio <= 1:
        raise ValueError(f"base_ratio must be in [0, 1], got {base_ratio}")
    region = region_of_crop.reshape(-1).long().cpu()  # (h*w,)
    if region.numel() and (region.min() < 0 or region.max() >= n_crops):
        raise ValueError(f"region_of_crop values must lie in [0, {n_crops}), "
                         f"got [{int(region.min())}, {int(region.max())}]")
    scores = thumb_cls_attn.reshape(-1).detach().cpu().double()  # (h*w,) float64 like the numpy original
    s = torch.zeros(n_crops, dtype=torch.float64).index_add_(0, region, scores)  # (n_crops,)
    e = torch.exp((s - s.max()) / temperature)  # (n_crops,)
    p = e / (e.sum() + 1e-8)  # (n_crops,)
    return (base_ratio * (1 + p - p.mean())).clamp(max=1.0)  # (n_crops,)


def crop_token_scores(
    local_cls_attn: Tensor,
    global_cls_attn_thumb: Tensor,
    *,
    full_hw: tuple[int, int],
    crop_rows: tuple[int, int],
    crop_cols: tuple[int, int],
) -> Tensor:
    """Score of each (unpadded) token of one crop: L2-normalised local + L2-normalised global.

    local_cls_attn: (n,) the crop's own scores over its unpadded tokens, raster order.
    global_cls_attn_thumb: (h_t, w_t) the thumbnail's scores on its grid.
    full_hw: (H, W) size of the unpadded stitched crop grid; the thumbnail map is resized to it
        with bilinear interpolation, align_corners=False (LA L200-209).
    crop_rows, crop_cols: [r0, r1), [c0, c1) of this crop inside that (H, W) grid (LA L213-234);
        n must equal (r1 - r0) * (c1 - c0).  Or (vlmdrop's extension, for LLaVA-OneVision's down-sampled
        grids) two ascending index tensors: the rows and columns of that grid the crop's tokens sit on
        (`stitched_crop_grids`); n = len(rows) * len(cols).
    Equivalent crop box on the thumbnail grid: rows r0*h_t/H .. r1*h_t/H, cols c0*w_t/W .. c1*w_t/W.
    Normalisation is F.normalize(p=2): x / max(||x||_2, 1e-12) over the crop (LA L255-258),
    not min-max and not sum-to-one.
    """
    if local_cls_attn.dim() != 1 or global_cls_attn_thumb.dim() != 2:
        raise ValueError(f"need local (n,) and thumbnail (h_t, w_t), got {tuple(local_cls_attn.shape)} "
                         f"and {tuple(global_cls_attn_thumb.shape)}")
    H, W = full_hw
    ri, ci = _span(crop_rows, H), _span(crop_cols, W)
    if ri is None or ci is None:
        raise ValueError(f"crop rows {_show(crop_rows)} / cols {_show(crop_cols)} outside the grid {full_hw}")
    n = ri.numel() * ci.numel()
    if local_cls_attn.shape[0] != n:
        raise ValueError(f"local_cls_attn has {local_cls_attn.shape[0]} scores, crop "
                         f"{_show(crop_rows)}x{_show(crop_cols)} has {n} tokens")
    resized = F.interpolate(global_cls_attn_thumb[None, None], size=(H, W), mode="bilinear",
                            align_corners=False)[0, 0]  # (H, W)
    dev = resized.device
    global_crop = resized[ri.to(dev)][:, ci.to(dev)].reshape(-1).to(local_cls_attn.dtype)  # (n,)
    return F.normalize(local_cls_attn, p=2, dim=0) + F.normalize(global_crop, p=2, dim=0)  # (n,)


def _span(span: tuple[int, int] | Tensor, size: int) -> Tensor | None:
    """[a, b) or an index tensor -> the (k,) long indices it names inside [0, size); None when outside."""
    if isinstance(span, Tensor):
        idx = span.long().reshape(-1)
        return idx if idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < size) else None
    a, b = span
    return torch.arange(a, b) if 0 <= a <= b <= size else None


def _show(span: tuple[int, int] | Tensor) -> object:
    return span.tolist() if isinstance(span, Tensor) else span


def official_crop_boxes(
    image_hw: tuple[int, int], *, n_rows: int, n_cols: int, side: int
) -> tuple[tuple[int, int], list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """Unpadded layout of the stitched crop grid as compress_crops sees it (LA L302-327).

    image_hw: the original image (height, width); the crop grid is n_rows x n_cols crops of
    side x side tokens. Unpadding keeps the centred rows (or columns) that hold the image:
    with grid (Hc, Wc) = (n_rows*side, n_cols*side), if W/H > Wc/Hc then
    pad = (Hc - int(H * Wc / W)) // 2 rows are cut top and bottom, else
    pad = (Wc - int(W * Hc / H)) // 2 columns left and right.
    Returns (full_hw, boxes, local_boxes): full_hw = size of the unpadded grid; for every crop in
    raster order, boxes = (r0, r1, c0, c1) inside the unpadded grid (the slice of the resized
    thumbnail map it gets) and local_boxes = (r0, r1, c0, c1) of its unpadded tokens inside the
    crop's own side x side grid. A crop entirely in padding gets empty boxes.
    """
    height, width = image_hw
    if min(height, width, n_rows, n_cols, side) < 1:
        raise ValueError(f"need positive sizes, got image_hw={image_hw}, n_rows={n_rows}, n_cols={n_cols}, side={side}")
    hc, wc = n_rows * side, n_cols * side
    v_r0, v_r1, v_c0, v_c1 = 0, hc, 0, wc
    if width / height > wc / hc:
        pad = (hc - int(height * (wc / width))) // 2
        v_r0, v_r1 = pad, hc - pad
    else:
        pad = (wc - int(width * (hc / height))) // 2
        v_c0, v_c1 = pad, wc - pad
    boxes, local_boxes = [], []
    for i in range(n_rows):
        for j in range(n_cols):
            r0, r1 = max(v_r0, i * side), min(v_r1, (i + 1) * side)
            c0, c1 = max(v_c0, j * side), min(v_c1, (j + 1) * side)
            if r1 <= r0 or c1 <= c0:
                boxes.append((0, 0, 0, 0))
                local_boxes.append((0, 0, 0, 0))
                continue
            boxes.append((r0 - v_r0, r1 - v_r0, c0 - v_c0, c1 - v_c0))
            local_boxes.append((r0 - i * side, r1 - i * side, c0 - j * side, c1 - j * side))
    return (v_r1 - v_r0, v_c1 - v_c0), boxes, local_boxes


def crop_keep_counts(n_tokens: Sequence[int], ratios: Sequence[float] | Tensor, *,
                     total: int | None = None) -> list[int]:
    """Tokens to keep per crop.

    total=None: the official rule, k_i = int(n_i * r_i) (floor, LA L251); the sum is not fixed.
    total=T: exact mode, sum k_i == T with 0 <= k_i <= n_i, proportional to n_i * r_i
        (largest remainder, ties to the lower index, capped shares redistributed); this is
        vlmdrop's own addition (`ops.budget.largest_remainder` with `normalize_first=True`, the
        floating-point order this mode has always used), not the official code.
    """
    ratios = [float(r) for r in ratios]
    if len(ratios) != len(n_tokens):
        raise ValueError(f"{len(n_tokens)} crops but {len(ratios)} ratios")
    bad = [r for r in ratios if not 0 <= r <= 1]
    if bad or any(n < 0 for n in n_tokens):
        raise ValueError(f"need ratios in [0, 1] and n >= 0, got ratios {ratios}, n {list(n_tokens)}")
    if total is None:
        return [int(n * r) for n, r in zip(n_tokens, ratios)]
    if not 0 <= total <= sum(n_tokens):
        raise ValueError(f"total must be in [0, {sum(n_tokens)}], got {total}")
    return largest_remainder([n * r for n, r in zip(n_tokens, ratios)], total, list(n_tokens), normalize_first=True)



def stitched_crop_boxes(
    local_indices: Sequence[Tensor], *, crop_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> dict[int, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """Where each sub-image's kept (unpadded) tokens sit in the stitched grid of all sub-images.

    local_indices: one (n_j,) long tensor per sub-image, in raster order over the `grid_hw` =
        (gh, gw) sub-image grid: the raster indices inside that crop's h x w (`crop_hw`) token grid
        of the positions it holds (LLaVA-NeXT unpadding removes whole rows or columns, so these fill
        a rectangle).
    Returns, for every sub-image j that holds a position: (full_hw, (r0, r1), (c0, c1)) where
    full_hw = (H, W) is the bounding box of every sub-image position on the stitched
    (gh*h) x (gw*w) grid, and [r0, r1) x [c0, c1) is sub-image j's box inside it (the arguments
    `crop_token_scores` takes).  Empty when no sub-image holds a position.
    """
    h, w = crop_hw
    gh, gw = grid_hw
    if gh * gw != len(local_indices):
        raise ValueError(f"grid {gh}x{gw} does not hold the {len(local_indices)} sub-images")
    spans = {}
    for j, local in enumerate(local_indices):
        if local.numel() == 0:
            continue
        r = (j // gw) * h + local // w  # (n_j,) stitched-grid rows
        q = (j % gw) * w + local % w  # (n_j,) stitched-grid cols
        spans[j] = (int(r.min()), int(r.max()) + 1, int(q.min()), int(q.max()) + 1)
    if not spans:  # unpadding left no sub-image position (extreme aspect ratio): nothing to score
        return {}
    top = min(s[0] for s in spans.values())
    bottom = max(s[1] for s in spans.values())
    left = min(s[2] for s in spans.values())
    right = max(s[3] for s in spans.values())
    full = (bottom - top, right - left)
    return {j: (full, (r0 - top, r1 - top), (c0 - left, c1 - left)) for j, (r0, r1, c0, c1) in spans.items()}


def stitched_crop_grids(
    local_indices: Sequence[Tensor], *, crop_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> dict[int, tuple[tuple[int, int], Tensor, Tensor]]:
    """`stitched_crop_boxes` for crops whose tokens fill a grid of rows × columns rather than a rectangle
    (LLaVA-OneVision: the anchor patches of a down-sampled grid's rows; a rectangle is the special case).

    Returns, for every sub-image j that holds a position: (full_hw, rows, cols), full_hw the bounding box
    of every sub-image position on the stitched grid, rows / cols the ascending (k,) indices, inside that
    box, of the rows and columns sub-image j's tokens sit on (the arguments `crop_token_scores` takes).
    """
    h, w = crop_hw
    gh, gw = grid_hw
    if gh * gw != len(local_indices):
        raise ValueError(f"grid {gh}x{gw} does not hold the {len(local_indices)} sub-images")
    lines = {}
    for j, local in enumerate(local_indices):
        if local.numel() == 0:
            continue
        lines[j] = (((j // gw) * h + local // w).unique(), ((j % gw) * w + local % w).unique())  # (R,), (C,)
    if not lines:
        return {}
    top = min(int(r.min()) for r, _ in lines.values())
    bottom = max(int(r.max()) for r, _ in lines.values()) + 1
    left = min(int(c.min()) for _, c in lines.values())
    right = max(int(c.max()) for _, c in lines.values()) + 1
    return {j: ((bottom - top, right - left), r - top, c - left) for j, (r, c) in lines.items()}
