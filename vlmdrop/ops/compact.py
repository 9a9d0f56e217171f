"""Compacting a (left-padded) batch after some positions are removed.

Tensors in, tensors out.  Used by the adapters at prefill (to shrink `input_ids`, `attention_mask`
and `position_ids` together with the visual rows) and at every decode step (to rewrite the caller's
full-length mask and positions so they match the shorter KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compaction:
    """Where each output slot of a compacted batch comes from.

    Attributes:
        src: (B, L_new) column of the input each output slot copies (0 for new padding slots).
        valid: (B, L_new) True where the slot holds a kept input position, False for new left padding.
        removed: (B,) number of positions removed from each row.
        removed_before: (B, L) for every input position, how many removed positions precede it in its row.
    """

    src: torch.Tensor
    valid: torch.Tensor
    removed: torch.Tensor
    removed_before: torch.Tensor

    @property
    def length(self) -> int:
        return self.src.shape[1]


def plan_compaction(keep: torch.Tensor) -> Compaction:
    """Plan the removal of `~keep` positions, re-padding rows of unequal length on the left.

    Args:
        keep: (B, L) bool, True for positions that stay.
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 2-D bool tensor, got {tuple(keep.shape)} {keep.dtype}")
    b, length = keep.shape
    kept_per_row = keep.sum(dim=1)  # (B,)
    l_new = int(kept_per_row.max().item()) if b else 0
    removed = length - kept_per_row  # (B,)
    removed_before = torch.cumsum((~keep).long(), dim=1) - (~keep).long()  # (B, L) exclusive count
    # Destination of each kept input column: right-aligned in a row of length l_new.
    dest = (l_new - kept_per_row)[:, None] + torch.cumsum(keep.long(), dim=1) - 1  # (B, L)
    src = torch.zeros(b, l_new, dtype=torch.long, device=keep.device)
    valid = torch.zeros(b, l_new, dtype=torch.bool, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    src[rows, dest[rows, cols]] = cols
    valid[rows, dest[rows, cols]] = True
    return Compaction(src=src, valid=valid, removed=removed, removed_before=removed_before)


def gather_rows(x: torch.Tensor, plan: Compaction, *, fill: int | float = 0) -> torch.Tensor:
    """Apply `plan` to a (B, L) or (B, L, ...) tensor; padding slots get `fill`."""
    idx = plan.src
    if x.dim() > 2:
        idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    out = torch.gather(x, 1, idx.to(x.device))
    valid = plan.valid.to(x.device).reshape(*plan.valid.shape, *([1] * (x.dim() - 2)))
    return torch.where(valid, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))



def slot_index(plan: Compaction, length: int) -> torch.Tensor:
    """(B, L) slot of each of the L input positions in the compacted batch, -1 for removed ones."""
    b, l_new = plan.src.shape
    device = plan.src.device
    where = torch.full((b, length), -1, dtype=torch.long, device=device)  # (B, L)
    rows = torch.arange(b, device=device)[:, None].expand_as(plan.src)  # (B, L_new)
    slots = torch.arange(l_new, device=device).expand_as(plan.src)  # (B, L_new)
    where[rows[plan.valid], plan.src[plan.valid]] = slots[plan.valid]
    return where


@dataclass
class Recompaction:
    """A further compaction of an already compacted batch, in the original positions' coordinates.

    Attributes:
        plan: `plan_compaction(keep)`: `src` (B, L_s) original position held by each slot, `valid`
            (B, L_s), `removed` (B,) positions removed so far (out of L).
        where: (B, L) slot of each original position in the new batch, -1 when removed.
        rows: (B, L_s, D) the rows of the new batch.
        mask: (B, L_s) bool attention mask of the new batch (False on new left padding).
    """

    plan: Compaction
    where: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor


def recompact(rows: torch.Tensor, keep: torch.Tensor, *, where_prev: torch.Tensor,
              mask: torch.Tensor) -> Recompaction:
    """Keep the original positions `keep` of a batch whose rows already skip some positions.

    Args:
        rows: (B, L_prev, D) the current batch.
        keep: (B, L) bool over the L original positions, True for those that stay; a subset of the
            positions still present (`where_prev >= 0`).
        where_prev: (B, L) slot in `rows` of each original position, -1 if removed earlier
            (`arange(L)` for a batch not compacted yet).
        mask: (B, L) bool attention mask of the original positions.

    New left-padding slots copy some row of `rows` (slot `where_prev[b, 0]`, or 0): they are masked out,
    unlike `gather_rows`, which fills them with zeros.
    """
    if keep.shape != where_prev.shape or keep.shape != mask.shape:
        raise ValueError(f"keep {tuple(keep.shape)}, where_prev {tuple(where_prev.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (B, L) shape")
    plan = plan_compaction(keep)
    where = slot_index(plan, keep.shape[1])  # (B, L)
    from_prev = where_prev.gather(1, plan.src).clamp(min=0)  # (B, L_s) rows of `rows` to take
    new_rows = rows.gather(1, from_prev[..., None].expand(-1, -1, rows.shape[-1]))  # (B, L_s, D)
    new_mask = gather_rows(mask, plan, fill=False)  # (B, L_s)
    return Recompaction(plan=plan, where=where, rows=new_rows, mask=new_mask)


def compact_positions(position_ids: torch.Tensor, plan: Compaction) -> torch.Tensor:
    """Positions after removal: every kept token moves back by the removed positions before it.

    Args:
        position_ids: (B, L) or (1, L) positions the unmodified model would use.

    Returns:
        (B, L_new) contiguous positions (padding slots 0, as `generate` uses).
    """
    b = plan.removed.shape[0]
    pos = position_ids.expand(b, -1) - plan.removed_before.to(position_ids.device)  # (B, L)
    return gather_rows(pos, plan, fill=0)


def gather_positions(position_ids: torch.Tensor, plan: Compaction, *,
                     columns: torch.Tensor | None = None) -> torch.Tensor:
    """Positions after removal when every kept token keeps its own (M-RoPE's "original" positions).

    Args:
        position_ids: (B or 1, L), (3, B, L) (M-RoPE t/h/w) or (4, B, L) (a text row, then t/h/w) positions the
            unmodified model would use.
        columns: (B, L) optional column whose position each column takes (default: its own).

    Returns:
        (B, L_new), (3, B, L_new) or (4, B, L_new): each kept slot's position (padding slots 0); a 4-row
        tensor's text row -- which transformers uses for masks, never for RoPE -- is renumbered
        contiguously, as `compact_positions`.
    """
    b = plan.removed.shape[0]
    if position_ids.dim() == 2:
        pos = position_ids.expand(b, -1)  # (B, L)
        if columns is not None:
            pos = pos.gather(1, columns.to(pos.device))
        return gather_rows(pos, plan, fill=0)
    if position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4):
        raise ValueError(f"position_ids must be (B, L), (3, B, L) or (4, B, L), got {tuple(position_ids.shape)}")
    rows = []
    for r, p in enumerate(position_ids):  # (B or 1, L) each
        if r == 0 and position_ids.shape[0] == 4:
            rows.append(compact_positions(p, plan))
        else:
            rows.append(gather_positions(p, plan, columns=columns))
    return torch.stack(rows)  # (3 or 4, B, L_new)


def extend_mask(prefix_mask: torch.Tensor, caller_mask: torch.Tensor | None, *, orig_prefix: int,
                tail: int) -> torch.Tensor:
    """Attention mask for a decode step on a compacted cache.

    Args:
        prefix_mask: (B, L_new) mask of the compacted prefill.
        caller_mask: (B, orig_prefix + tail) the caller's mask for the unmodified sequence, or None
            (all ones).
        orig_prefix: L, the caller's prefill length.
        tail: tokens after the prefill, this step's included.

    Returns:
        (B, L_new + tail) mask.
    """
    b = prefix_mask.shape[0]
    if caller_mask is None:
        tail_mask = torch.ones(b, tail, dtype=prefix_mask.dtype, device=prefix_mask.device)
    else:
        if caller_mask.dim() != 2 or caller_mask.shape[1] != orig_prefix + tail:
            raise ValueError(
                f"attention_mask has shape {tuple(caller_mask.shape)} but this decode step expects "
                f"(batch, {orig_prefix + tail}) = prefill length {orig_prefix} + {tail} new tokens; "
                "vlmdrop supports 2-D masks that cover the whole sequence"
            )
        tail_mask = caller_mask[:, orig_prefix:].to(prefix_mask.dtype)
    return torch.cat([prefix_mask.to(tail_mask.device), tail_mask], dim=1)


def last_index(mask2d: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) position of the last True of each row (0 for an all-False row)."""
    n = mask2d.shape[1]
    idx = torch.arange(n, device=mask2d.device).expand_as(mask2d)  # (B, L)
    return torch.where(mask2d, idx, -1).max(dim=1).values.clamp(min=0)  # (B,)


def scatter_back(full: torch.Tensor, src: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`full` (B, L, D) with the compacted `rows` (B, L_s, D) written back at the positions `src`
    (B, L_s) they came from; slots where `valid` (B, L_s) is False (new padding) are skipped."""
    src, valid = src.to(rows.device), valid.to(rows.device)
    b = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(src)  # (B, L_s)
    return full.to(device=rows.device, dtype=rows.dtype).index_put((b[valid], src[valid]), rows[valid])  # (B, L, D)
