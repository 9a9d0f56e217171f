"""Fused compaction: kept rows, attention mask and position ids of a left-padded batch in one launch.

Same semantics as `vlmdrop.ops.compact` (`plan_compaction` + `gather_rows` + `compact_positions`):
every row keeps its True positions in ascending order, right-aligned in a batch of length
L_new = max kept per row; the new left-padding slots get `fill` rows, mask False and position 0.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from vlmdrop.ops.compact import compact_positions, gather_rows, plan_compaction


def compact_rows_torch(x: torch.Tensor, keep: torch.Tensor, position_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None, *,
                       fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch fallback: the pure ops composed (see `vlmdrop.kernels.compact_rows` for the contract)."""
    plan = plan_compaction(keep)
    rows = gather_rows(x, plan, fill=fill)  # (B, L_new, D)
    valid = plan.valid.to(x.device)  # (B, L_new)
    if attention_mask is not None:
        valid = valid & gather_rows(attention_mask.bool(), plan, fill=False)  # (B, L_new)
    pos = compact_positions(position_ids, plan)  # (B, L_new)
    return rows, valid, pos


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def compact_kernel(x_ptr, keep_ptr, pos_ptr, am_ptr, out_ptr, out_mask_ptr, out_pos_ptr,
                       L, L_new, D, fill,
                       sxb, sxl, sxd, skb, spb, sab, sob, sol, sod, somb, sopb,
                       HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        lanes = tl.arange(0, BLOCK_L)  # (BLOCK_L,)
        # Kept positions of this row before the block, and in the whole row.
        before = tl.zeros((), dtype=tl.int32)
        total = tl.zeros((), dtype=tl.int32)
        for start in range(0, L, BLOCK_L):
            c = start + lanes
            kv = tl.load(keep_ptr + b * skb + c, mask=c < L, other=0).to(tl.int32)  # (BLOCK_L,)
            n = tl.sum(kv, axis=0)
            total += n
            before += tl.where(start < blk * BLOCK_L, n, 0)
        pad = L_new - total
        cols = blk * BLOCK_L + lanes  # (BLOCK_L,) input columns of this program
        in_row = cols < L
        kv = tl.load(keep_ptr + b * skb + cols, mask=in_row, other=0).to(tl.int32)  # (BLOCK_L,)
        cum = before + tl.cumsum(kv, axis=0)  # (BLOCK_L,) inclusive kept count
        kept = (kv != 0) & in_row
        dest = pad + cum - 1  # (BLOCK_L,) output slot of each kept column
        # Positions: every kept token moves back by the removed positions before it (cols - (cum - 1)).
        p = tl.load(pos_ptr + b * spb + cols, mask=kept, other=0)
        tl.store(out_pos_ptr + b * sopb + dest, p - cols + cum - 1, mask=kept)
        if HAS_MASK:
            m = tl.load(am_ptr + b * sab + cols, mask=kept, other=0)
            tl.store(out_mask_ptr + b * somb + dest, (m != 0).to(tl.int8), mask=kept)
        else:
            tl.store(out_mask_ptr + b * somb + dest, tl.full((BLOCK_L,), 1, tl.int8), mask=kept)
        # New left padding: the output slots of this block's range that lie before `pad`.
        is_pad = (cols < pad) & (cols < L_new)
        tl.store(out_pos_ptr + b * sopb + cols, tl.zeros((BLOCK_L,), tl.int64), mask=is_pad)
        tl.store(out_mask_ptr + b * somb + cols, tl.zeros((BLOCK_L,), tl.int8), mask=is_pad)
        dlanes = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dlanes
            dm = d < D
            tile = tl.load(x_ptr + b * sxb + cols[:, None] * sxl + d[None, :] * sxd,
                           mask=kept[:, None] & dm[None, :], other=0)  # (BLOCK_L, BLOCK_D)
            tl.store(out_ptr + b * sob + dest[:, None] * sol + d[None, :] * sod, tile,
                     mask=kept[:, None] & dm[None, :])
            pad_tile = (tl.zeros((BLOCK_L, BLOCK_D), tl.float32) + fill).to(tile.dtype)
            tl.store(out_ptr + b * sob + cols[:, None] * sol + d[None, :] * sod, pad_tile,
                     mask=is_pad[:, None] & dm[None, :])

    return compact_kernel


def compact_rows_triton(x: torch.Tensor, keep: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None, *,
                        fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path: one launch over (B, L / BLOCK_L) programs writes rows, mask and positions."""
    import triton

    b, length, d = x.shape
    l_new = int(keep.sum(dim=1).max().item()) if b else 0
    out = torch.empty(b, l_new, d, dtype=x.dtype, device=x.device)  # (B, L_new, D)
    out_mask = torch.empty(b, l_new, dtype=torch.int8, device=x.device)  # (B, L_new)
    out_pos = torch.empty(b, l_new, dtype=torch.long, device=x.device)  # (B, L_new)
    if b == 0 or length == 0 or l_new == 0:
        return out, out_mask.bool(), out_pos
    keep_i = keep.to(torch.int8).contiguous()  # (B, L)
    pos = position_ids.to(device=x.device, dtype=torch.long).expand(b, -1).contiguous()  # (B, L)
    am = (attention_mask.to(device=x.device, dtype=torch.int8).contiguous()
          if attention_mask is not None else keep_i)  # (B, L)
    block_l = min(128, triton.next_power_of_2(length))
    block_d = min(64, triton.next_power_of_2(d))
    grid = (b, triton.cdiv(length, block_l))
    _kernel()[grid](x, keep_i, pos, am, out, out_mask, out_pos, length, l_new, d, float(fill),
                    x.stride(0), x.stride(1), x.stride(2), keep_i.stride(0), pos.stride(0), am.stride(0),
                    out.stride(0), out.stride(1), out.stride(2), out_mask.stride(0), out_pos.stride(0),
                    HAS_MASK=attention_mask is not None, BLOCK_L=block_l, BLOCK_D=block_d)
    return out, out_mask.bool(), out_pos
