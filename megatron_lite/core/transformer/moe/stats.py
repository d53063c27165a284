"""Parameter counts of an MoE model: the total, and those one token passes through (the active ones)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.moe_checks import parse_moe_layer_freq


@dataclass(frozen=True)
class MoEParameterCounts:
    """Whole-model counts (no TP/EP split): total, active per token, and the routed experts' share."""

    total: int
    active: int
    routed_experts: int


def moe_parameter_counts(cfg, dense_total: int) -> MoEParameterCounts:
    """From the dense model's count (every layer with an MLP of --ffn-hidden-size): each MoE layer swaps
    that MLP for a router [E, h] (+ bias), E experts of --moe-ffn-hidden-size and the shared experts;
    a token uses the router, top-k experts and the shared experts."""
    h, glu = cfg.hidden_size, 2 if cfg.swiglu else 1
    bias = cfg.add_bias_linear

    def mlp(ffn: int, with_bias: bool) -> int:
        return ffn * glu * h + h * ffn + ((ffn * glu + h) if with_bias else 0)

    moe_layers = sum(parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers))
    e, k, ffn = cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size
    router = e * h + (e if bias else 0)
    shared = 0
    if cfg.moe_shared_expert_intermediate_size is not None:
        shared = mlp(cfg.moe_shared_expert_intermediate_size, False) + (
            h if cfg.moe_shared_expert_gate else 0
        )
    base = dense_total - moe_layers * mlp(cfg.ffn_hidden_size, bias)
    expert = mlp(ffn, bias)
    return MoEParameterCounts(
        total=base + moe_layers * (router + e * expert + shared),
        active=base + moe_layers * (router + k * expert + shared),
        routed_experts=moe_layers * e * expert,
    )
