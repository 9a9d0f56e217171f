"""Attention rows from captured queries and keys — no N×N matrix is ever formed."""

from __future__ import annotations

import torch


def query_row_attention(q: torch.Tensor, k: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys.

    Args:
        q: (B, H, Q, D) queries (Q is small: the CLS row, or the last prompt token).
        k: (B, H, N, D) keys (already expanded to H heads for GQA, RoPE already applied).
        scale: the layer's softmax scaling (usually D ** -0.5).

    Returns:
        (B, H, Q, N) attention probabilities in float32.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, *, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim")
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Q, N)
    return logits.softmax(dim=-1)


def cls_attention_from_projections(q_proj_out: torch.Tensor, k_proj_out: torch.Tensor, *, num_heads: int,
                                   scale: float) -> torch.Tensor:
    """CLS-token attention row of a ViT layer from its q_proj / k_proj outputs.

    Args:
        q_proj_out: (B, D) the CLS token's query (position 0 of q_proj's output), or (B, N, D).
        k_proj_out: (B, N, D) keys of all N tokens (CLS first).
        num_heads: attention heads H, with D = H * head_dim.
        scale: softmax scaling.

    Returns:
        (B, H, N) attention of the CLS query over all N tokens (CLS column included), float32.
    """
    if q_proj_out.dim() == 3:
        q_proj_out = q_proj_out[:, 0]
    b, n, d = k_proj_out.shape
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not divisible by num_heads={num_heads}")
    hd = d // num_heads
    q = q_proj_out.reshape(b, num_heads, 1, hd)  # (B, H, 1, hd)
    k = k_proj_out.reshape(b, n, num_heads, hd).transpose(1, 2)  # (B, H, N, hd)
    return query_row_attention(q, k, scale=scale)[:, :, 0]  # (B, H, N)


def cls_logits_from_projections(q: torch.Tensor, k: torch.Tensor, *, num_heads: int, scale: float) -> torch.Tensor:
    """Pre-softmax CLS logits q_cls·k·scale of a ViT layer from its q_proj / k_proj outputs.

    Args:
        q: (B, D) the CLS token's query.
        k: (B, N, D) keys of all N tokens (CLS first).
        num_heads: attention heads H, with D = H * head_dim.
        scale: softmax scaling.

    Returns:
        (B, H, N) logits, float32 (their softmax over N is `cls_attention_from_projections`).
    """
    b, n, d = k.shape
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not divisible by num_heads={num_heads}")
    qh = q.float().reshape(b, num_heads, 1, d // num_heads)  # (B, H, 1, hd)
    kh = k.float().reshape(b, n, num_heads, d // num_heads).transpose(1, 2)  # (B, H, N, hd)
    return (qh @ kh.transpose(-1, -2))[:, :, 0] * scale  # (B, H, N)


#: the saliency scores a vision-stage method can ask for (`score=` of HiRED, VisionZip, GlobalCom2)
SCORES = ("auto", "cls", "received")


def resolve_score(score: str, *, has_cls: bool, tower: str = "vision tower") -> str:
    """The score a capture computes: "cls" or "received".

    "auto" is "cls" when the tower has a CLS token and "received" otherwise; "cls" on a tower without
    one is a ValueError naming the tower.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not valid; valid scores: {', '.join(SCORES)}")
    if score == "auto":
        return "cls" if has_cls else "received"
    if score == "cls" and not has_cls:
        raise ValueError(f"score='cls': the {tower} has no CLS token; use score='received' (or 'auto')")
    return score

