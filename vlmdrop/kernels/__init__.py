"""The one small interface to vlmdrop's kernels: Triton on CUDA, a torch fallback elsewhere.

Each function dispatches to its Triton kernel when the tensors are on CUDA and `triton` imports,
and to the torch fallback otherwise.  The environment variable `VLMDROP_KERNELS` overrides this:
`triton` forces the Triton path (also on CPU, where it runs under `TRITON_INTERPRET=1`), `torch`
forces the fallback, `auto` (or unset) is the default.  Both paths give the same results: bit-exact
for `compact_rows` and `segmented_topk`, equal to float32 rounding for `attention_received`.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from vlmdrop.kernels.attention_received import attention_received_torch, attention_received_triton
from vlmdrop.kernels.compact import compact_rows_torch, compact_rows_triton
from vlmdrop.kernels.topk import segmented_topk_torch, segmented_topk_triton

__all__ = ["attention_received", "compact_rows", "segmented_topk", "triton_available", "use_triton"]

logger = logging.getLogger(__name__)

_MODES = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when `import triton` succeeds."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on `tensors` takes the Triton path (see the module docstring)."""
    mode = os.environ.get("VLMDROP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"VLMDROP_KERNELS={mode!r} is not one of {_MODES}")
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise ImportError("VLMDROP_KERNELS=triton but triton cannot be imported")
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def compact_rows(x: torch.Tensor, keep: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather every row's kept positions into a packed, left-padded batch, with its mask and positions.

    Args:
        x: (B, L, D) rows (visual features or embeddings), any dtype.
        keep: (B, L) bool, True for positions that stay; rows may keep different counts.
        position_ids: (B, L) or (1, L) positions of the unmodified sequence; default `arange(L)`.
        attention_mask: (B, L) the caller's mask (any dtype, nonzero = attend), or None (all ones).
        fill: value of the new left-padding rows.

    Returns:
        rows (B, L_new, D) with L_new = max kept per row, kept order ascending, right-aligned;
        mask (B, L_new) bool, False on new padding (and where `attention_mask` was 0);
        positions (B, L_new) long, each kept token moved back by the removed positions before it,
        0 on padding — exactly `vlmdrop.ops.compact.gather_rows` / `compact_positions`.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    if keep.dtype != torch.bool or keep.shape != x.shape[:2]:
        raise ValueError(f"keep must be a bool (B, L) = {tuple(x.shape[:2])} tensor, "
                         f"got {tuple(keep.shape)} {keep.dtype}")
    b, length = keep.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=x.device)[None]  # (1, L)
    if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, b):
        raise ValueError(f"position_ids must be (B, L) or (1, L) with B={b}, L={length}, "
                         f"got {tuple(position_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != keep.shape:
        raise ValueError(f"attention_mask must be (B, L) = {tuple(keep.shape)}, got {tuple(attention_mask.shape)}")
    keep = keep.to(x.device)
    if use_triton(x, keep):
        return compact_rows_triton(x, keep, position_ids, attention_mask, fill=fill)
    return compact_rows_torch(x, keep, position_ids.to(x.device),
                              None if attention_mask is None else attention_mask.to(x.device), fill=fill)


def segmented_topk(scores: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Top k_c of every segment (crop) of a flat score vector, in one launch.

    Args:
        scores: (N,) concatenated scores of C segments, any float dtype (compared in float32), no NaN.
        lengths: (C,) length of each segment, summing to N.
        ks: (C,) how many to keep of each segment, 0 <= k_c <= lengths[c].

    Returns:
        (sum k_c,) long indices into `scores`, segment by segment, ascending within each; ties go
        to the lower index — segment c gives exactly `vlmdrop.ops.topk.top_k(segment_c, k_c) + offset_c`.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=scores.device).reshape(-1)  # (C,)
    ks = torch.as_tensor(ks, dtype=torch.long, device=scores.device).reshape(-1)  # (C,)
    if lengths.shape != ks.shape:
        raise ValueError(f"lengths {tuple(lengths.shape)} and ks {tuple(ks.shape)} must both be (C,)")
    if int(lengths.sum()) != scores.numel() or bool((lengths < 0).any()):
        raise ValueError(f"lengths {lengths.tolist()} must be >= 0 and sum to N={scores.numel()}")
    bad = (ks < 0) | (ks > lengths)
    if bool(bad.any()):
        c = int(bad.nonzero()[0])
        raise ValueError(f"cannot keep k={int(ks[c])} of {int(lengths[c])} tokens in segment {c}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; the top-k has no order for them")
    if use_triton(scores):
        return segmented_topk_triton(scores, lengths, ks)
    return segmented_topk_torch(scores, lengths, ks)


def attention_received(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool = False,
                       chunk: int = 256) -> torch.Tensor:
    """Mean attention each key receives: softmax(q kᵀ · scale) averaged over queries, per head.

    Args:
        q: (B, H, Q, D) queries of a layer (RoPE applied).
        k: (B, H, N, D) keys, already expanded to H heads.
        scale: the layer's softmax scaling (usually D ** -0.5).
        causal: query i sees keys j <= i + N - Q (needs N >= Q).
        chunk: queries per block of the torch fallback (its peak memory is O(B·H·chunk·N)).

    Returns:
        (B, H, N) float32; each (b, h) row sums to 1.  No N×N matrix is stored on either path.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, *, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"causal attention needs N >= Q, got Q={q.shape[2]} queries and N={k.shape[2]} keys")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if use_triton(q, k):
        return attention_received_triton(q, k, scale=scale, causal=causal)
    return attention_received_torch(q, k, scale=scale, causal=causal, chunk=chunk)
