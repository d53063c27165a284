"""Llama-layout models whose every MLP is a top-k softmax MoE (--num-experts) <-> HuggingFace
MixtralForCausalLM (transformers' fused expert tensors)."""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.config.moe_checks import aux_loss_coeff, parse_moe_layer_freq
from megatron_lite.convert import llama
from megatron_lite.convert.common import TensorSource, make_hf_config, sliding_window
from megatron_lite.errors import fail

HF_ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"

# Mixtral's router: softmax over all experts, top-k, renormalised: the same probabilities as Megatron's
# default softmax over the top-k logits. Its experts are stored fused: gate_up_proj [E, 2 ffn, h] with
# [gate; up] rows (our linear_fc1) and down_proj [E, h, ffn] (our linear_fc2).
strip_prefixes = llama.strip_prefixes
_OURS_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_HF_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a MixtralForCausalLM cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    llama.check_llama_layout(cfg, target, transformers.MixtralConfig)
    problems = {
        "--disable-bias-linear is off (Mixtral has no biases)": cfg.add_bias_linear or cfg.qkv_bias,
        "--moe-layer-freq leaves dense layers (every Mixtral layer is MoE)": 0
        in parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers),
        "--moe-router-score-function sigmoid": cfg.moe_router_score_function != "softmax",
        "--moe-router-topk-scaling-factor": bool(cfg.moe_router_topk_scaling_factor),
        "group-limited routing": cfg.moe_router_group_topk is not None,
        "--moe-router-enable-expert-bias": cfg.moe_router_enable_expert_bias,
        "--moe-shared-expert-intermediate-size": cfg.moe_shared_expert_intermediate_size is not None,
        "--moe-expert-capacity-factor (token dropping)": cfg.moe_expert_capacity_factor is not None,
        "--window-size": sliding_window(cfg) is not None,
    }
    for what, present in problems.items():
        if present:
            fail(f"{target}: {what} has no Mixtral equivalent")


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers MixtralConfig of this model."""
    config_class = transformers.MixtralConfig
    values = llama.base_config_values(cfg, config_class, HF_ARCHITECTURE, dtype, eos, extra)
    values.update(
        intermediate_size=cfg.moe_ffn_hidden_size,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk,
        router_aux_loss_coef=aux_loss_coeff(cfg, "aux_loss"),
        sliding_window=None,
    )
    return make_hf_config(config_class, **values)


def weights_to_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> MixtralForCausalLM's state dict (attention and norms as Llama's)."""
    h, ffn, e = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    experts: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
        experts[hf + "gate.weight"] = src.take(ours + "router.weight", (e, h))
        fc1 = [
            src.take(ours + f"experts.local_experts.{j}.linear_fc1.weight", (2 * ffn, h)) for j in range(e)
        ]
        fc2 = [src.take(ours + f"experts.local_experts.{j}.linear_fc2.weight", (h, ffn)) for j in range(e)]
        experts[hf + "experts.gate_up_proj"] = torch.stack(fc1)
        experts[hf + "experts.down_proj"] = torch.stack(fc2)
        # Llama's converter expects a dense MLP: give it one to take, then drop what it makes of it.
        src.tensors[f"decoder.layers.{i}.{_OURS_MLP[0]}"] = torch.zeros(2 * ffn, h)
        src.tensors[f"decoder.layers.{i}.{_OURS_MLP[1]}"] = torch.zeros(h, ffn)
    out = llama.weights_to_hf(src, dataclasses.replace(cfg, ffn_hidden_size=ffn))
    for i in range(cfg.num_layers):
        for name in _HF_MLP:
            del out[f"model.layers.{i}.{name}"]
        for name in _OURS_MLP:
            del src.tensors[f"decoder.layers.{i}.{name}"]
            src.taken.discard(f"decoder.layers.{i}.{name}")
    out.update(experts)
    return out


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a MixtralConfig."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    values = llama.base_config_from_hf(hf, target)
    if getattr(hf, "sliding_window", None) is not None:
        fail(f"{target}: sliding_window {hf.sliding_window} (megatron-lite's MoE export/import has none yet)")
    if float(getattr(hf, "router_jitter_noise", 0.0) or 0.0) > 0:
        fail(f"{target}: router_jitter_noise {hf.router_jitter_noise} is not implemented")
    values.update(
        num_experts=hf.num_local_experts,
        moe_ffn_hidden_size=hf.intermediate_size,
        moe_router_topk=hf.num_experts_per_tok,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    )
    return values


def weights_from_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """A MixtralForCausalLM state dict (prefixes stripped) -> full megatron-lite tensors for cfg."""
    h, ffn, e = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    experts: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{i}.mlp.", f"layers.{i}.mlp."
        experts[ours + "router.weight"] = src.take(hf + "gate.weight", (e, h))
        gate_up = src.take(hf + "experts.gate_up_proj", (e, 2 * ffn, h))
        down = src.take(hf + "experts.down_proj", (e, h, ffn))
        for j in range(e):
            experts[ours + f"experts.local_experts.{j}.linear_fc1.weight"] = gate_up[j].clone()
            experts[ours + f"experts.local_experts.{j}.linear_fc2.weight"] = down[j].clone()
        src.tensors[hf + "gate_proj.weight"] = torch.zeros(ffn, h)
        src.tensors[hf + "up_proj.weight"] = torch.zeros(ffn, h)
        src.tensors[hf + "down_proj.weight"] = torch.zeros(h, ffn)
    out = llama.weights_from_hf(src, dataclasses.replace(cfg, ffn_hidden_size=ffn))
    for i in range(cfg.num_layers):
        for name in _OURS_MLP:
            del out[f"decoder.layers.{i}.{name}"]
        for name in _HF_MLP:
            key = f"layers.{i}.{name}"
            del src.tensors[key]
            src.taken.discard(key)
    out.update(experts)
    return out
