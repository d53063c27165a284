"""Mixture of experts (Megatron's megatron/core/transformer/moe): router, token dispatchers, experts,
shared experts and the MoE layer, with expert parallelism."""

from __future__ import annotations

from megatron_lite.config.moe_checks import parse_moe_layer_freq


def is_moe_layer(cfg, layer_index: int) -> bool:
    """Whether layer `layer_index` (0-based) has an MoE block instead of the dense MLP."""
    if cfg.num_experts is None:
        return False
    return parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)[layer_index] == 1
