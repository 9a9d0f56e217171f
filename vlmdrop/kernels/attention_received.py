"""Streaming attention received: the column mean over queries of softmax(q kᵀ · scale), per head.

Conventions of `vlmdrop.ops.attention`: q (B, H, Q, D), k (B, H, N, D) already expanded to H heads,
RoPE applied; `scale` is the layer's softmax scaling; results in float32.  With `causal=True`
query i sees keys j <= i + N - Q (bottom-right alignment, the last Q of N positions); the mean is
still over all Q queries.  No (Q, N) matrix is ever stored: memory O(B·H·(Q + N)).
"""

from __future__ import annotations

import torch


def attention_received_torch(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool,
                             chunk: int) -> torch.Tensor:
    """Torch fallback in query chunks: peak memory O(B·H·chunk·N)."""
    b, h, nq, _ = q.shape
    n = k.shape[2]
    kf = k.float()  # (B, H, N, D)
    out = torch.zeros(b, h, n, dtype=torch.float32, device=q.device)  # (B, H, N)
    cols = torch.arange(n, device=q.device)  # (N,)
    for s in range(0, nq, chunk):
        qc = q[:, :, s:s + chunk].float()  # (B, H, c, D)
        logits = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # (B, H, c, N)
        if causal:
            rows = torch.arange(s, s + qc.shape[2], device=q.device) + (n - nq)  # (c,)
            logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        out += logits.softmax(dim=-1).sum(dim=2)  # (B, H, N)
    return out / max(nq, 1)


try:  # optional: the Triton path is defined only where triton imports (module-level, as the interpreter needs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the interface falls back to torch
    triton = None

if triton is not None:

    @triton.jit
    def _logits_block(q_ptr, k_ptr, bh, qi, nj, NQ, N, D, scale, sqb, sqq, sqd, skb, skn, skd,
                      CAUSAL: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """(BQ, BN) scaled logits q·kᵀ of query rows `qi` and key rows `nj`, -inf where not visible."""
        qm = qi < NQ
        nm = nj < N
        dd = tl.arange(0, BD)  # (BD,)
        s = tl.zeros((BQ, BN), tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + dd
            qt = tl.load(q_ptr + bh * sqb + qi[:, None] * sqq + d[None, :] * sqd,
                         mask=qm[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)  # (BQ, BD)
            kt = tl.load(k_ptr + bh * skb + nj[:, None] * skn + d[None, :] * skd,
                         mask=nm[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)  # (BN, BD)
            s += tl.dot(qt, tl.trans(kt), input_precision="ieee")  # (BQ, BN), full fp32 (no TF32)
        ok = qm[:, None] & nm[None, :]
        if CAUSAL:
            ok = ok & (nj[None, :] <= qi[:, None] + (N - NQ))
        return tl.where(ok, s * scale, float("-inf"))

    @triton.jit
    def _row_stats_kernel(q_ptr, k_ptr, m_ptr, l_ptr, NQ, N, D, scale, sqb, sqq, sqd, skb, skn, skd,
                          CAUSAL: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """Pass 1, grid (B·H, Q / BQ): running max m and normaliser l of every query row."""
        bh = tl.program_id(0)
        qi = tl.program_id(1) * BQ + tl.arange(0, BQ)  # (BQ,)
        m = tl.full((BQ,), float("-inf"), tl.float32)
        l_acc = tl.zeros((BQ,), tl.float32)
        for n0 in range(0, N, BN):
            nj = n0 + tl.arange(0, BN)  # (BN,)
            s = _logits_block(q_ptr, k_ptr, bh, qi, nj, NQ, N, D, scale, sqb, sqq, sqd, skb, skn, skd,
                              CAUSAL, BQ, BN, BD)  # (BQ, BN)
            m_new = tl.maximum(m, tl.max(s, axis=1))  # (BQ,)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_acc = l_acc * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m = m_new
        qm = qi < NQ
        tl.store(m_ptr + bh * NQ + qi, m, mask=qm)
        tl.store(l_ptr + bh * NQ + qi, l_acc, mask=qm)

    @triton.jit
    def _received_kernel(q_ptr, k_ptr, m_ptr, l_ptr, out_ptr, NQ, N, D, scale, sqb, sqq, sqd, skb, skn, skd,
                         CAUSAL: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """Pass 2, grid (B·H, N / BN): each key block sums its normalised probabilities over all queries."""
        bh = tl.program_id(0)
        nj = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,)
        acc = tl.zeros((BN,), tl.float32)
        for q0 in range(0, NQ, BQ):
            qi = q0 + tl.arange(0, BQ)  # (BQ,)
            qm = qi < NQ
            s = _logits_block(q_ptr, k_ptr, bh, qi, nj, NQ, N, D, scale, sqb, sqq, sqd, skb, skn, skd,
                              CAUSAL, BQ, BN, BD)  # (BQ, BN)
            m = tl.load(m_ptr + bh * NQ + qi, mask=qm, other=0.0)  # (BQ,)
            l_row = tl.load(l_ptr + bh * NQ + qi, mask=qm, other=1.0)  # (BQ,)
            p = tl.exp(s - m[:, None]) / l_row[:, None]  # (BQ, BN); exp(-inf) = 0 where not visible
            acc += tl.sum(tl.where(s == float("-inf"), 0.0, p), axis=0)  # (BN,)
        tl.store(out_ptr + bh * N + nj, acc / NQ, mask=nj < N)


def attention_received_triton(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool) -> torch.Tensor:
    """Triton path, flash-style in two launches: row statistics (m, l), then column sums per key block."""
    b, h, nq, d = q.shape
    n = k.shape[2]
    out = torch.zeros(b * h, n, dtype=torch.float32, device=q.device)  # (B·H, N)
    if nq == 0 or n == 0 or b * h == 0:
        return out.reshape(b, h, n)
    q3 = q.reshape(b * h, nq, d)  # (B·H, Q, D)
    k3 = k.reshape(b * h, n, d)  # (B·H, N, D)
    m = torch.empty(b * h, nq, dtype=torch.float32, device=q.device)  # (B·H, Q)
    l_sum = torch.empty(b * h, nq, dtype=torch.float32, device=q.device)  # (B·H, Q)
    bq = bn = bd = 32  # tl.dot needs blocks of at least 16; masks cover the ragged ends
    strides = (q3.stride(0), q3.stride(1), q3.stride(2), k3.stride(0), k3.stride(1), k3.stride(2))
    _row_stats_kernel[(b * h, triton.cdiv(nq, bq))](q3, k3, m, l_sum, nq, n, d, float(scale), *strides,
                                        CAUSAL=causal, BQ=bq, BN=bn, BD=bd)
    _received_kernel[(b * h, triton.cdiv(n, bn))](q3, k3, m, l_sum, out, nq, n, d, float(scale), *strides,
                                          CAUSAL=causal, BQ=bq, BN=bn, BD=bd)
    return out.reshape(b, h, n)
