"""RoPE, RMSNorm, SwiGLU and grouped-query attention against straightforward formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import make_config

from megatron_lite.core.models.gpt.attention import DotProductAttention
from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.models.gpt.norms import LayerNorm, RMSNorm, build_norm
from megatron_lite.core.models.gpt.rope import RotaryEmbedding, apply_rotary_pos_emb
from megatron_lite.core.tensor_parallel import seed_model_parallel_rng
from megatron_lite.errors import UserError


def test_rope_rotates_channel_pairs_by_position_times_frequency():
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=100)
    x = torch.randn(5, 2, 3, 8)  # [s, b, heads, d]
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = rope(positions)
    out = apply_rotary_pos_emb(x, cos, sin)
    for b in range(2):
        for t in range(5):
            for i in range(4):  # channel i pairs with channel i + 4
                angle = positions[b, t].item() * 100 ** (-2 * i / 8)
                x1, x2 = x[t, b, :, i], x[t, b, :, i + 4]
                torch.testing.assert_close(out[t, b, :, i], x1 * math.cos(angle) - x2 * math.sin(angle))
                torch.testing.assert_close(out[t, b, :, i + 4], x2 * math.cos(angle) + x1 * math.sin(angle))


def test_rope_scores_depend_only_on_relative_position_and_partial_rope_passes_through():
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=0.5)
    assert rope.dim == 8
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rotary_pos_emb(q, cq, sq) * apply_rotary_pos_emb(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10), atol=1e-5, rtol=0)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    cos, sin = rope(torch.tensor([[5]]))
    assert torch.equal(apply_rotary_pos_emb(q, cos, sin)[..., 8:], q[..., 8:])


def test_rope_with_an_odd_rotary_dimension_is_a_user_error():
    with pytest.raises(UserError, match=r"--rotary-percent 0.375 of head size 8 gives 3 rotary channels"):
        RotaryEmbedding(kv_channels=8, rotary_percent=0.375)


def test_rmsnorm_formula_and_fp32_math():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(4, 3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), expected)
    x16 = (x * 100).bfloat16()
    out16 = norm(x16)
    assert out16.dtype == torch.bfloat16
    expected16 = (x16.float() / torch.sqrt(x16.float().pow(2).mean(-1, keepdim=True) + 1e-5)) * norm.weight
    assert torch.equal(out16, expected16.bfloat16())


def test_build_norm_picks_normalization_and_epsilon():
    rms = build_norm(make_config(normalization="RMSNorm", layernorm_epsilon=1e-6))
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-6
    ln = build_norm(make_config())
    assert isinstance(ln, LayerNorm) and ln.eps == 1e-5
    x = torch.randn(3, 32)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), eps=1e-5))


def test_swiglu_mlp_is_silu_gate_times_up():
    cfg = make_config(swiglu=True, add_bias_linear=False)
    assert cfg.ffn_hidden_size == 64  # int(8h/3 / 64) * 64 for h = 32
    mlp = MLP(cfg)
    w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    gate_w, up_w = w1[:64], w1[64:]
    x = torch.randn(5, 2, 32)
    expected = (F.silu(x @ gate_w.t()) * (x @ up_w.t())) @ w2.t()
    torch.testing.assert_close(mlp(x), expected)


def _naive_gqa(q, k, v, heads_per_group, keep):
    """q [sq, b, a, d], k/v [sk, b, g, d] -> [sq, b, a*d], one head at a time."""
    outs = []
    for h in range(q.shape[2]):
        kk, vv = k[:, :, h // heads_per_group], v[:, :, h // heads_per_group]  # [sk, b, d]
        scores = torch.einsum("qbd,kbd->bqk", q[:, :, h], kk) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
        outs.append(torch.einsum("bqk,kbd->qbd", probs, vv))
    return torch.cat(outs, dim=-1)


def test_grouped_query_attention_matches_per_head_loop_with_and_without_cache_offset():
    attn = DotProductAttention(0.0, num_heads=6, num_groups=2, head_dim=4).eval()
    q, k, v = torch.randn(7, 2, 6, 4), torch.randn(7, 2, 2, 4), torch.randn(7, 2, 2, 4)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(q, k, v), _naive_gqa(q, k, v, 3, causal))
    # Three new queries after four cached positions: query i sees keys 0 .. 4 + i.
    torch.testing.assert_close(attn(q[4:], k, v), _naive_gqa(q[4:], k, v, 3, causal[4:]))


def test_attention_dropout_path_applies_the_recorded_mask_to_the_same_probabilities():
    seed_model_parallel_rng(1234)
    attn = DotProductAttention(0.5, num_heads=4, num_groups=2, head_dim=4).train()
    seen = []
    attn.attention_dropout.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    q, k, v = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 2, 4), torch.randn(6, 2, 2, 4)
    out = attn(q, k, v)
    probs, dropped = seen[0]  # [b, heads, s, s]
    kept = dropped != 0
    assert 0.3 < kept[probs > 0].float().mean() < 0.7
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(
        probs,
        torch.softmax(
            (torch.einsum("qbhd,kbhd->bhqk", q, k.repeat_interleave(2, dim=2)) / 2).masked_fill(
                ~causal, float("-inf")
            ),
            -1,
        ),
    )
    expected = torch.einsum("bhqk,kbhd->qbhd", probs * kept / 0.5, v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, expected.reshape(6, 2, 16))
