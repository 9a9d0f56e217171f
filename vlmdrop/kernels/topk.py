"""Segmented top-k: the top k_c scores of every segment (crop) of a flat score vector, in one launch.

Tie rule (the one of `vlmdrop.ops.topk.top_k`): scores are compared in float32; among equal scores
the lower index wins.  Element i of a segment is kept iff its rank
`#{j : s_j > s_i} + #{j < i : s_j == s_i}` is below k_c.  NaN scores are rejected by the interface.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def segmented_topk_torch(scores: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Torch fallback: pad segments to (C, M) with -inf, stable-sort each, keep the first k_c."""
    c = lengths.numel()
    if c == 0 or int(ks.sum()) == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    m = int(lengths.max())
    offsets = torch.cumsum(lengths, 0) - lengths  # (C,) start of each segment
    cols = torch.arange(m, device=scores.device)  # (M,)
    inside = cols[None, :] < lengths[:, None]  # (C, M)
    flat = (offsets[:, None] + cols[None, :]).clamp(max=max(scores.numel() - 1, 0))  # (C, M)
    padded = torch.where(inside, scores.float()[flat], float("-inf"))  # (C, M)
    # Padding sits after a segment's genuine entries, so a stable sort ranks it below any genuine -inf.
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices  # (C, M)
    chosen = torch.where(cols[None, :] < ks[:, None], order, m)  # (C, M), m = not chosen
    chosen = chosen.sort(dim=1).values  # (C, M) ascending, chosen first
    return (chosen + offsets[:, None])[cols[None, :] < ks[:, None]]  # (sum k_c,)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def topk_kernel(s_ptr, off_ptr, len_ptr, k_ptr, out_off_ptr, out_ptr,
                    BLOCK: tl.constexpr):
        seg = tl.program_id(0)
        start = tl.load(off_ptr + seg)
        n = tl.load(len_ptr + seg)
        k = tl.load(k_ptr + seg)
        out_start = tl.load(out_off_ptr + seg)
        lanes = tl.arange(0, BLOCK)  # (BLOCK,)
        written = tl.zeros((), dtype=tl.int64)
        for i0 in range(0, n, BLOCK):
            i = i0 + lanes  # (BLOCK,) candidates
            im = i < n
            si = tl.load(s_ptr + start + i, mask=im, other=0.0)  # (BLOCK,)
            rank = tl.zeros((BLOCK,), dtype=tl.int64)
            for j0 in range(0, n, BLOCK):
                j = j0 + lanes  # (BLOCK,) competitors
                jm = j < n
                sj = tl.load(s_ptr + start + j, mask=jm, other=0.0)  # (BLOCK,)
                beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
                rank += tl.sum((beats & jm[None, :]).to(tl.int64), axis=1)  # (BLOCK,)
            sel = im & (rank < k)  # (BLOCK,)
            slot = written + tl.cumsum(sel.to(tl.int64), axis=0) - 1  # (BLOCK,) ascending order
            tl.store(out_ptr + out_start + slot, start + i.to(tl.int64), mask=sel)
            written += tl.sum(sel.to(tl.int64), axis=0)

    return topk_kernel


def segmented_topk_triton(scores: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Triton path: one program per segment ranks its entries block by block (O(n_c^2) compares)."""
    import triton

    total = int(ks.sum())
    out = torch.empty(total, dtype=torch.long, device=scores.device)  # (sum k_c,)
    if total == 0:
        return out
    s = scores.float().contiguous()  # (N,)
    offsets = (torch.cumsum(lengths, 0) - lengths).contiguous()  # (C,)
    out_offsets = (torch.cumsum(ks, 0) - ks).contiguous()  # (C,)
    block = min(128, triton.next_power_of_2(max(int(lengths.max()), 1)))
    _kernel()[(lengths.numel(),)](s, offsets, lengths.contiguous(), ks.contiguous(), out_offsets, out,
                                  BLOCK=block)
    return out
