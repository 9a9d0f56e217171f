"""Pure LLM-score ops against transformers' own Llama attention (eager weights): RoPE, GQA, masks."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

from vlmdrop.ops.llm_scores import last_token_attention
from vlmdrop.ops.rope import apply_rope, repeat_kv
from vlmdrop.ops.topk import top_k


def _config(kv_heads):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=64,
                      num_hidden_layers=1, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    return cfg


def test_apply_rope_matches_transformers():
    torch.manual_seed(0)
    cfg = _config(2)
    rope = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    pos = torch.tensor([[0, 1, 2, 5, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9]])
    cos, sin = rope(q, pos)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k)
    assert torch.equal(repeat_kv(k, 2)[:, 1], k[:, 0]) and torch.equal(repeat_kv(k, 2)[:, 2], k[:, 1])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_last_token_attention_equals_eager_row(kv_heads):
    """The captured-projection row equals row `last` of the eager attention weights, mean over heads."""
    torch.manual_seed(kv_heads)
    cfg = _config(kv_heads)
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    b, n = 2, 9
    x = torch.randn(b, n, 32)
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6], list(range(9))])  # row 0 left-padded by 2
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]).bool()
    cos, sin = rope(x, pos)
    causal = torch.ones(n, n).tril().bool()
    allowed = causal[None] & pad[:, None, :]  # (B, N, N)
    allowed |= torch.eye(n, dtype=torch.bool)[None]  # padding rows see themselves (no empty softmax)
    mask = torch.zeros(b, 1, n, n).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    cap = {}
    hq = attn.q_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("q", o))
    hk = attn.k_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("k", o))
    with torch.no_grad():
        _, weights = attn(x, position_embeddings=(cos, sin), attention_mask=mask)  # (B, H, N, N)
    hq.remove()
    hk.remove()
    last = torch.tensor([n - 1, n - 1])
    got = last_token_attention(cap["q"], cap["k"], cos=cos, sin=sin, query_index=last, key_mask=pad,
                               num_heads=4, num_kv_heads=kv_heads, scale=attn.scaling)
    ref = weights[:, :, -1].mean(dim=1)  # (B, N)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert torch.all(got[0, :2] == 0)

    # an earlier query position: keys after it must be masked by the caller
    mid = torch.tensor([5, 5])
    key_mask = pad & (torch.arange(n)[None] <= 5)
    got_mid = last_token_attention(cap["q"], cap["k"], cos=cos, sin=sin, query_index=mid, key_mask=key_mask,
                                   num_heads=4, num_kv_heads=kv_heads, scale=attn.scaling)
    torch.testing.assert_close(got_mid, weights[:, :, 5].mean(dim=1), atol=1e-6, rtol=1e-5)

    # only the query rows projected (PyramidDrop's rule projects one query per sample): the same row
    rows = attn.q_proj(x[torch.arange(b), mid]).detach()  # (B, H*D)
    got_rows = last_token_attention(rows, cap["k"], cos=cos, sin=sin, query_index=mid, key_mask=key_mask,
                                    num_heads=4, num_kv_heads=kv_heads, scale=attn.scaling)
    torch.testing.assert_close(got_rows, weights[:, :, 5].mean(dim=1), atol=1e-6, rtol=1e-5)


def test_last_token_attention_rejects_bad_shapes():
    q, k = torch.randn(1, 5, 16), torch.randn(1, 5, 8)
    cos = sin = torch.ones(1, 5, 4)
    with pytest.raises(ValueError, match="k_proj output"):
        last_token_attention(q, torch.randn(1, 5, 6), cos=cos, sin=sin, query_index=torch.tensor([4]),
                             key_mask=torch.ones(1, 5, dtype=torch.bool), num_heads=4, num_kv_heads=2, scale=0.5)
    with pytest.raises(ValueError, match="key_mask"):
        last_token_attention(q, k, cos=cos, sin=sin, query_index=torch.tensor([4]),
                             key_mask=torch.ones(1, 4, dtype=torch.bool), num_heads=4, num_kv_heads=2, scale=0.5)


def test_top_k_ties_and_bounds():
    s = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5])
    assert top_k(s, 2).tolist() == [1, 2]  # ties: the lower index wins
    assert top_k(s, 5).tolist() == [0, 1, 2, 3, 4]
    assert top_k(s, 0).tolist() == []
    with pytest.raises(ValueError, match="k=6 of 5"):
        top_k(s, 6)
