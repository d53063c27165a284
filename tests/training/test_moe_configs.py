"""The MoE example configs parse, validate and build, and count their active parameters below the total."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lite.arguments import parse_config
from megatron_lite.training.flops import num_floating_point_operations

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["mixtral-style", "qwen-moe-style", "deepseek-style"])
def test_moe_config_validates(name):
    cfg = parse_config(["--yaml-cfg", str(CONFIGS / f"{name}.yaml"), "--mock-data"]).finalize(8, 50257)
    assert cfg.num_experts is not None and isinstance(cfg.moe_layer_freq, list)
    dense_equivalent = parse_config(["--yaml-cfg", str(CONFIGS / f"{name}.yaml"), "--mock-data"])
    dense_equivalent.num_experts = None
    for key in list(vars(dense_equivalent)):
        if key.startswith("moe_") and key not in ("moe_layer_freq",):
            setattr(dense_equivalent, key, type(dense_equivalent)().__dict__[key])
    dense_equivalent.moe_layer_freq = 1
    dense_equivalent.ffn_hidden_size = cfg.moe_ffn_hidden_size * cfg.num_experts
    dense_equivalent.finalize(8, 50257)
    # Active FLOPs: top-k experts, far fewer than a dense layer as wide as all experts together.
    assert num_floating_point_operations(cfg, 1) < num_floating_point_operations(dense_equivalent, 1)
