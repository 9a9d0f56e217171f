"""vlmdrop.kernels: the torch fallbacks against explicit references, and the Triton kernels (run on CPU
through TRITON_INTERPRET=1 in a subprocess, so the variable never leaks into other tests) bit-equal to
the fallbacks.  Shapes stay tiny (N <= 64): the interpreter is slow."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmdrop import kernels
from vlmdrop.ops.topk import top_k

compact_mod = importlib.import_module("vlmdrop.kernels.compact")
topk_mod = importlib.import_module("vlmdrop.kernels.topk")
received_mod = importlib.import_module("vlmdrop.kernels.attention_received")

DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------- explicit references (plain loops / N×N)

def ref_compact(x, keep, position_ids, attention_mask, fill):
    """Row by row: kept rows ascending, right-aligned; positions minus removed-before; padding fill/False/0."""
    b, length, d = x.shape
    counts = [int(keep[i].sum()) for i in range(b)]
    l_new = max(counts) if b else 0
    rows = torch.full((b, l_new, d), fill, dtype=x.dtype)
    mask = torch.zeros(b, l_new, dtype=torch.bool)
    pos = torch.zeros(b, l_new, dtype=torch.long)
    pids = position_ids.expand(b, -1)
    for i in range(b):
        cols = [c for c in range(length) if keep[i, c]]
        for slot, c in enumerate(cols, start=l_new - counts[i]):
            rows[i, slot] = x[i, c]
            mask[i, slot] = True if attention_mask is None else bool(attention_mask[i, c])
            pos[i, slot] = pids[i, c] - sum(1 for j in range(c) if not keep[i, j])
    return rows, mask, pos


def ref_topk(scores, lengths, ks):
    out, start = [], 0
    for n, k in zip(lengths, ks):
        out.append(top_k(scores[start:start + n], k) + start)
        start += n
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def ref_received(q, k, scale, causal):
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Q, N), the explicit N×N matrix
    nq, n = q.shape[2], k.shape[2]
    if causal:
        bad = torch.arange(n)[None, :] > torch.arange(nq)[:, None] + (n - nq)
        logits = logits.masked_fill(bad, float("-inf"))
    return logits.softmax(-1).mean(2)  # (B, H, N)


# ---------------------------------------------------------------- random cases (shared by both paths)

def compact_cases():
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for b, length, d in [(1, 1, 1), (3, 17, 5), (2, 64, 7), (4, 9, 70)]:  # d=70 > one BLOCK_D
            x = torch.randn(b, length, d, generator=g).to(dtype)
            keep = torch.rand(b, length, generator=g) < 0.5
            keep[0] = True  # a full row
            if b > 1:
                keep[1] = False  # an empty row
            pos = torch.randint(0, 5, (b, 1), generator=g) + torch.arange(length)  # (B, L) shifted
            mask = (torch.rand(b, length, generator=g) < 0.8).long()
            yield x, keep, pos, mask, 0.0
            yield x, keep, torch.arange(length)[None], None, -1.5
        x = torch.randn(2, 12, 3, generator=g).to(dtype)
        yield x, torch.zeros(2, 12, dtype=torch.bool), torch.arange(12)[None], None, 0.0  # empty selection
        yield x, torch.ones(2, 12, dtype=torch.bool), torch.arange(12)[None], None, 0.0  # full selection
    # what the prefill compacts: input_ids (and labels) ride as (B, L, 1) int64 rows, filled with the pad id / -100
    ids = torch.randint(0, 50000, (3, 17, 1), generator=g)
    keep = torch.rand(3, 17, generator=g) < 0.6
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, :4] = 0  # the caller's left padding
    yield ids, keep, torch.arange(17)[None], mask, 2
    yield ids - 100, keep, torch.arange(17)[None], None, -100


def topk_cases():
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for lengths in [[5], [10, 0, 13, 7], [64, 3, 1], [33, 31]]:
            n = sum(lengths)
            ties = torch.randint(0, 4, (n,), generator=g).float()  # many ties
            spread = torch.randn(n, generator=g)
            spread[::7] = float("-inf")
            for scores in (ties, spread):
                ks = [int(torch.randint(0, m + 1, (1,), generator=g)) for m in lengths]
                yield scores.to(dtype), lengths, ks
                yield scores.to(dtype), lengths, [0] * len(lengths)  # empty selection
                yield scores.to(dtype), lengths, list(lengths)  # full selection


def received_cases():
    g = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        for b, h, nq, n, d in [(1, 1, 1, 1, 4), (2, 3, 9, 11, 8), (1, 2, 64, 64, 16), (1, 1, 5, 40, 40)]:
            q = (torch.randn(b, h, nq, d, generator=g) * 2).to(dtype)
            k = (torch.randn(b, h, n, d, generator=g) * 2).to(dtype)
            for causal in (False, True):
                yield q, k, d ** -0.5, causal


# ---------------------------------------- checks, run in-process (torch) and in a subprocess (triton)

def check_compact() -> None:
    expect_triton = os.environ.get("VLMDROP_KERNELS") == "triton"
    for x, keep, pos, mask, fill in compact_cases():
        assert kernels.use_triton(x) == expect_triton
        got = kernels.compact_rows(x, keep, position_ids=pos, attention_mask=mask, fill=fill)
        fallback = compact_mod.compact_rows_torch(x, keep, pos, mask, fill=fill)
        ref = ref_compact(x, keep, pos, mask, fill)
        for name, a, f, r in zip(("rows", "mask", "positions"), got, fallback, ref):
            assert a.dtype == f.dtype == r.dtype and torch.equal(a, f) and torch.equal(a, r), (name, x.shape, x.dtype)


def check_topk() -> None:
    expect_triton = os.environ.get("VLMDROP_KERNELS") == "triton"
    for scores, lengths, ks in topk_cases():
        assert kernels.use_triton(scores) == expect_triton
        got = kernels.segmented_topk(scores, lengths, ks)
        fallback = topk_mod.segmented_topk_torch(scores, torch.tensor(lengths), torch.tensor(ks))
        ref = ref_topk(scores, lengths, ks)
        assert got.dtype == torch.long and torch.equal(got, fallback) and torch.equal(got, ref), (lengths, ks)


def check_received() -> None:
    expect_triton = os.environ.get("VLMDROP_KERNELS") == "triton"
    for q, k, scale, causal in received_cases():
        assert kernels.use_triton(q, k) == expect_triton
        got = kernels.attention_received(q, k, scale=scale, causal=causal, chunk=4)
        fallback = received_mod.attention_received_torch(q, k, scale=scale, causal=causal, chunk=4)
        ref = ref_received(q, k, scale, causal)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, fallback, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the torch fallbacks

@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("VLMDROP_KERNELS", "torch")


def test_compact_fallback_matches_row_by_row_reference(torch_kernels):
    check_compact()


def test_topk_fallback_matches_per_crop_top_k_with_ties(torch_kernels):
    check_topk()


def test_received_fallback_matches_explicit_nxn(torch_kernels):
    check_received()


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_received_fallback_chunks_agree(torch_kernels, chunk):
    q, k = torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 8)
    torch.testing.assert_close(kernels.attention_received(q, k, scale=0.3, causal=True, chunk=chunk),
                               ref_received(q, k, 0.3, True), rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_takes_the_fallback(monkeypatch):
    monkeypatch.delenv("VLMDROP_KERNELS", raising=False)
    assert not kernels.use_triton(torch.zeros(1))

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU tensors without VLMDROP_KERNELS=triton")

    monkeypatch.setattr(kernels, "compact_rows_triton", boom)
    monkeypatch.setattr(kernels, "segmented_topk_triton", boom)
    monkeypatch.setattr(kernels, "attention_received_triton", boom)
    kernels.compact_rows(torch.zeros(1, 2, 3), torch.tensor([[True, False]]))
    kernels.segmented_topk(torch.zeros(3), [3], [1])
    kernels.attention_received(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), scale=0.5)


def test_bad_inputs_name_the_value(monkeypatch):
    monkeypatch.setenv("VLMDROP_KERNELS", "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("VLMDROP_KERNELS", "torch")
    with pytest.raises(ValueError, match="k=4 of 3 tokens in segment 1"):
        kernels.segmented_topk(torch.zeros(5), [2, 3], [1, 4])
    with pytest.raises(ValueError, match=r"sum to N=5"):
        kernels.segmented_topk(torch.zeros(5), [2, 2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        kernels.segmented_topk(torch.tensor([0.0, float("nan")]), [2], [1])
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        kernels.compact_rows(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="Q=5 queries and N=3 keys"):
        kernels.attention_received(torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 3, 4), scale=1.0, causal=True)


# ---------------------------------------------------------------- the Triton kernels under the interpreter

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _run_in_interpreter(check: str) -> None:
    """Run `check` of this file in a fresh process with TRITON_INTERPRET=1 and VLMDROP_KERNELS=triton."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('kernel_checks', {str(Path(__file__))!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            f"mod.{check}()\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLMDROP_KERNELS": "triton"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("check", ["check_compact", "check_topk", "check_received"])
def test_triton_kernel_equals_fallback_under_interpreter(check):
    _run_in_interpreter(check)
