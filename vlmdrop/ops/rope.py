"""Rotary position embedding (RoPE) and grouped-query head expansion, as pure tensor functions.

They reproduce what a Llama-style attention does to its queries and keys between the projections
and the softmax, so that an attention row can be recomputed from captured `q_proj` / `k_proj`
outputs and the `position_embeddings = (cos, sin)` the layer received.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): the second half negated, swapped in front of the first half."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their positions.

    Args:
        x: (B, H, N, D) per-head queries or keys.
        cos, sin: (B or 1, N, D) the layer's `position_embeddings` for those N positions.

    Returns:
        (B, H, N, D) rotated, in x's dtype.
    """
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"apply_rope wants x (B, H, N, D) and cos/sin (B, N, D); got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"cos/sin cover {tuple(cos.shape[-2:])} (N, D) but x has {tuple(x.shape[-2:])}")
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, N, D)
    return x * c + rotate_half(x) * s


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * n_rep, N, D): each key/value head repeated for its query group."""
    if n_rep < 1:
        raise ValueError(f"n_rep={n_rep} must be >= 1")
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)
