"""MoE flags: Megatron's names and defaults, --moe-layer-freq parsed without eval, and one-line errors."""

from __future__ import annotations

import pytest

from megatron_lite.arguments import parse_config
from megatron_lite.config.moe_checks import parse_moe_layer_freq
from megatron_lite.errors import UserError
from megatron_lite.training.flops import num_floating_point_operations
from tests.helpers import tiny_config, tiny_flags

MOE = {"num_experts": 4}


def _finalize(world: int = 1, **overrides):
    cfg = parse_config(tiny_flags(train_iters=1, vocab_size=257, **overrides))
    return cfg.finalize(world, None)


@pytest.mark.parametrize(
    "text, want",
    [
        ("([0]*1+[1]*3)", [0, 1, 1, 1]),
        ("([1]*1+[0]*1)*2", [1, 0, 1, 0]),
        ("[1,0,0,1]", [1, 0, 0, 1]),
        ("2", [1, 0, 1, 0]),
        (3, [1, 0, 0, 1]),
        ([0, 1, 1, 0], [0, 1, 1, 0]),
    ],
)
def test_moe_layer_freq_patterns(text, want):
    assert parse_moe_layer_freq(text, 4) == want


def test_flags_parse_to_megatron_dests():
    cfg = _finalize(
        num_experts=4,
        moe_layer_freq="([0]*1+[1]*1)",
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=0.01,
        moe_router_topk=1,
    )
    assert cfg.moe_layer_freq == [0, 1]
    assert cfg.moe_router_load_balancing_type == "seq_aux_loss"  # one-element list -> scalar, as Megatron
    assert cfg.moe_aux_loss_coeff == 0.01
    assert cfg.moe_ffn_hidden_size == cfg.ffn_hidden_size == 128
    assert cfg.expert_tensor_parallel_size == 1


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ({**MOE, "moe_router_topk": 5}, 1, "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        ({"num_experts": 3, "expert_model_parallel_size": 2}, 2, "--num-experts 3 is not divisible by"),
        (
            {
                **MOE,
                "expert_model_parallel_size": 2,
                "tensor_model_parallel_size": 2,
                "sequence_parallel": True,
            },
            2,
            "= 4 ranks per expert group does not divide the world size 2",
        ),
        ({**MOE, "moe_layer_freq": "([0]*1+[1]*1"}, 1, "--moe-layer-freq ([0]*1+[1]*1: expected an integer"),
        ({**MOE, "moe_layer_freq": "__import__('os')"}, 1, "--moe-layer-freq __import__('os'): expected"),
        ({**MOE, "moe_layer_freq": "([1]*3)"}, 1, "the pattern has 3 entries but --num-layers is 2"),
        (
            {"moe_router_topk": 1},
            1,
            "--moe-router-topk is a mixture-of-experts setting: it needs --num-experts",
        ),
        ({"moe_grouped_gemm": True}, 1, "--moe-grouped-gemm is a mixture-of-experts setting"),
        ({"expert_model_parallel_size": 2}, 2, "--expert-model-parallel-size needs --num-experts"),
        ({**MOE, "moe_router_enable_expert_bias": True}, 1, "needs --moe-router-score-function sigmoid"),
        ({**MOE, "moe_router_num_groups": 3, "moe_router_group_topk": 1}, 1, "must divide --num-experts 4"),
        ({**MOE, "moe_pad_expert_input_to_capacity": True}, 1, "needs --moe-expert-capacity-factor"),
        ({**MOE, "moe_router_score_function": "sqrtsoftplus"}, 1, "is not implemented in megatron-lite"),
        ({**MOE, "moe_layer_recompute": True}, 1, "not implemented yet (issue 14)"),
        ({**MOE, "moe_shared_expert_intermediate_size": 64}, 1, "shared experts have no biases"),
        ({**MOE, "moe_layer_freq": 0}, 1, "--moe-layer-freq 0: an integer frequency must be >= 1"),
        ({**MOE, "moe_layer_freq": "([0]*1+[2]*1)"}, 1, "the pattern may only hold 0 (dense) and 1 (MoE)"),
        ({**MOE, "tensor_model_parallel_size": 2, "add_bias_linear": False}, 2, "needs --sequence-parallel"),
    ],
)
def test_bad_input_is_one_line(overrides, world, message):
    with pytest.raises(UserError) as err:
        _finalize(world, **overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_flops_count_active_parameters_only():
    """Megatron's MFU count: a top-k MoE layer costs k experts (plus shared ones), not num_experts."""
    dense = tiny_config(ffn_hidden_size=64)
    moe = tiny_config(ffn_hidden_size=64, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)
    more_experts = tiny_config(ffn_hidden_size=64, num_experts=64, moe_router_topk=2, moe_ffn_hidden_size=32)
    half = tiny_config(
        ffn_hidden_size=64, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16, moe_layer_freq="([0]+[1])",
    )  # fmt: skip
    f = num_floating_point_operations
    assert f(moe, 4) == f(dense, 4) == f(more_experts, 4)  # 2 experts x 32 = the dense 64
    s, layers, h = 16, 2, 32
    # One dense layer (ffn 64) and one MoE layer (2 x 16 = 32): the MLP term drops by 32 / 2 per layer.
    assert f(dense, 4) - f(half, 4) == pytest.approx(12.0 * 4 * s * layers * h * h * (16 / h))
