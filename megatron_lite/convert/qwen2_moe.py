"""Llama layout with q/k/v biases and top-k softmax MoE layers plus a sigmoid-gated shared expert
(--moe-shared-expert-intermediate-size with --moe-shared-expert-gate) <-> HuggingFace Qwen2MoeForCausalLM."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.convert import llama, qwen3_moe
from megatron_lite.convert.common import TensorSource, make_hf_config
from megatron_lite.errors import fail

HF_ARCHITECTURE = "Qwen2MoeForCausalLM"
MODEL_TYPE = "qwen2_moe"

# Qwen2-MoE's MoE block: the routed experts as Qwen3-MoE's, plus shared_expert (a SwiGLU MLP of
# shared_expert_intermediate_size) scaled by sigmoid(shared_expert_gate(x)), shared_expert_gate [1, h]:
# Megatron's shared expert with --moe-shared-expert-gate (gate_weight [1, h]). Every MoE layer has both,
# so a model without the gate has no Qwen2-MoE form. Attention has q/k/v biases (qkv_bias) and none on
# o_proj: Megatron's --add-qkv-bias without linear biases.
strip_prefixes = llama.strip_prefixes


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a Qwen2MoeForCausalLM cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    qwen3_moe.check_moe_exportable(cfg, target, transformers.Qwen2MoeConfig, "Qwen2-MoE")
    if cfg.qk_layernorm:
        fail(
            f"{target}: --qk-layernorm has no Qwen2-MoE equivalent (Qwen3-MoE has q/k norms, no shared expert)"
        )
    if cfg.moe_shared_expert_intermediate_size is None:
        fail(
            f"{target}: every Qwen2-MoE layer has a shared expert; give --moe-shared-expert-intermediate-size"
        )
    if not cfg.moe_shared_expert_gate:
        fail(
            f"{target}: Qwen2-MoE always gates its shared expert with a sigmoid; the model was trained "
            "without --moe-shared-expert-gate"
        )


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers Qwen2MoeConfig of this model."""
    config_class = transformers.Qwen2MoeConfig
    values = llama.base_config_values(cfg, config_class, HF_ARCHITECTURE, dtype, eos, extra)
    values.update(
        qwen3_moe.moe_config_values(cfg),
        shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        qkv_bias=cfg.qkv_bias,
        max_window_layers=0,
        layer_types=["full_attention"] * cfg.num_layers,
    )
    return make_hf_config(config_class, **values)


def _moe_layer_to_hf(src: TensorSource, cfg: MegatronConfig, layer: int) -> dict[str, torch.Tensor]:
    h, ffn = cfg.hidden_size, cfg.moe_shared_expert_intermediate_size
    out = qwen3_moe.routed_experts_to_hf(src, cfg, layer)
    ours, hf = f"decoder.layers.{layer}.mlp.shared_experts.", f"model.layers.{layer}.mlp."
    gate, up = src.take(ours + "linear_fc1.weight", (2 * ffn, h)).chunk(2)
    out[hf + "shared_expert.gate_proj.weight"] = gate
    out[hf + "shared_expert.up_proj.weight"] = up
    out[hf + "shared_expert.down_proj.weight"] = src.take(ours + "linear_fc2.weight", (h, ffn))
    out[hf + "shared_expert_gate.weight"] = src.take(ours + "gate_weight", (1, h))
    return out


def weights_to_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> Qwen2MoeForCausalLM's state dict (no o_proj bias: Qwen2-MoE has none
    and the export refuses the linear biases that would make ours non-zero)."""
    out = qwen3_moe.moe_weights_to_hf(src, cfg, _moe_layer_to_hf)
    for i in range(cfg.num_layers):
        out.pop(f"model.layers.{i}.self_attn.o_proj.bias", None)
    return out


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a Qwen2MoeConfig; UserError for what megatron-lite cannot compute."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    values = llama.base_config_from_hf(hf, target)
    values.update(llama.bias_fields(bool(getattr(hf, "qkv_bias", True)), False))
    values.update(qwen3_moe.moe_config_from_hf(hf, target))
    shared = int(hf.shared_expert_intermediate_size or 0)
    if shared <= 0:
        fail(f"{target}: shared_expert_intermediate_size {shared} (megatron-lite's shared expert needs >= 1)")
    values.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    return values


def _moe_layer_from_hf(src: TensorSource, cfg: MegatronConfig, layer: int) -> dict[str, torch.Tensor]:
    h, ffn = cfg.hidden_size, cfg.moe_shared_expert_intermediate_size
    out = qwen3_moe.routed_experts_from_hf(src, cfg, layer)
    ours, hf = f"decoder.layers.{layer}.mlp.shared_experts.", f"layers.{layer}.mlp."
    gate = src.take(hf + "shared_expert.gate_proj.weight", (ffn, h))
    up = src.take(hf + "shared_expert.up_proj.weight", (ffn, h))
    out[ours + "linear_fc1.weight"] = torch.cat((gate, up))
    out[ours + "linear_fc2.weight"] = src.take(hf + "shared_expert.down_proj.weight", (h, ffn))
    out[ours + "gate_weight"] = src.take(hf + "shared_expert_gate.weight", (1, h))
    return out


def weights_from_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """A Qwen2MoeForCausalLM state dict (prefixes stripped) -> full megatron-lite tensors for cfg."""
    return qwen3_moe.moe_weights_from_hf(src, cfg, _moe_layer_from_hf)
