"""The attention one query token (the last prompt token) pays every key in an LLM layer.

Built from the layer's own projections: queries and keys split into heads, RoPE applied with the
positions the layer used, key heads repeated for grouped-query attention, one softmax row per head
over the keys the token may see (the others masked to -inf).  Never an N×N matrix: one row per sample,
the whole batch in one matmul (no loop over samples).
"""

from __future__ import annotations

import torch

from .rope import apply_rope, repeat_kv


def last_token_attention(q_proj_out: torch.Tensor, k_proj_out: torch.Tensor, *, cos: torch.Tensor,
                         sin: torch.Tensor, query_index: torch.Tensor, key_mask: torch.Tensor, num_heads: int,
                         num_kv_heads: int, scale: float, q_norm: torch.nn.Module | None = None,
                         k_norm: torch.nn.Module | None = None) -> torch.Tensor:
    """Attention of one query position per sample over all keys, averaged over heads.

    Args:
        q_proj_out: (B, N, H * D) the layer's query projection, or (B, H * D): only the query rows
            (the projection of the `query_index` tokens, e.g. computed for those rows alone).
        k_proj_out: (B, N, Hkv * D) the layer's key projection.
        cos, sin: (B or 1, N, D) the position embeddings the layer received.
        query_index: (B,) position of the query token in each row (e.g. the last prompt token).
        key_mask: (B, N) bool, keys the query may attend to (padding and later positions False).
        num_heads, num_kv_heads: H and Hkv (H a multiple of Hkv).
        scale: the layer's softmax scaling.
        q_norm, k_norm: per-head norms some models (Qwen3, ...) apply before RoPE, or None.

    Returns:
        (B, N) float32: the mean over heads of the softmax row; 0 at masked keys.
    """
    if q_proj_out.dim() == 2:
        b, qd = q_proj_out.shape
        n = k_proj_out.shape[1]
    else:
        b, n, qd = q_proj_out.shape
    if qd % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"query width {qd} / num_heads={num_heads} / num_kv_heads={num_kv_heads} do not divide")
    d = qd // num_heads
    if k_proj_out.shape != (b, n, num_kv_heads * d):
        raise ValueError(f"k_proj output {tuple(k_proj_out.shape)} does not match "
                         f"(B, N, Hkv*D) = {(b, n, num_kv_heads * d)}")
    if key_mask.shape != (b, n) or query_index.shape != (b,):
        raise ValueError(f"key_mask {tuple(key_mask.shape)} / query_index {tuple(query_index.shape)} "
                         f"must be {(b, n)} / {(b,)}")
    rows = torch.arange(b, device=q_proj_out.device)
    qi = query_index.to(q_proj_out.device)
    q_rows = q_proj_out if q_proj_out.dim() == 2 else q_proj_out[rows, qi]  # (B, H*D)
    q = q_rows.reshape(b, 1, num_heads, d)  # (B, 1, H, D)
    k = k_proj_out.reshape(b, n, num_kv_heads, d)  # (B, N, Hkv, D)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    q = q.transpose(1, 2)  # (B, H, 1, D)
    k = k.transpose(1, 2)  # (B, Hkv, N, D)
    cos_b, sin_b = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # (B, N, D)
    q = apply_rope(q, cos_b[rows, qi][:, None], sin_b[rows, qi][:, None])  # (B, H, 1, D)
    k = repeat_kv(apply_rope(k, cos_b, sin_b), num_heads // num_kv_heads)  # (B, H, N, D)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, 1, N)
    visible = key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, N)
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)  # (B, H, 1, N); NaN where no key
    probs = probs.masked_fill(~visible, 0.0)  # a row without visible keys: all 0, as masked keys are
    return probs[:, :, 0].mean(dim=1)  # (B, N)
