"""Qwen3 layout (--qk-layernorm) with top-k softmax MoE layers (--num-experts) <-> HuggingFace
Qwen3MoeForCausalLM, and the MoE-layer weight mapping Qwen2MoeForCausalLM shares."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.config.moe_checks import aux_loss_coeff, parse_moe_layer_freq
from megatron_lite.convert import llama
from megatron_lite.convert.common import TensorSource, make_hf_config, sliding_window
from megatron_lite.errors import fail

HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"

# HF's router: p = softmax(logits over all experts), the top-k of p, divided by their sum when
# norm_topk_prob. Megatron's default (softmax over the top-k logits) is the renormalised form exactly;
# --moe-router-pre-softmax (softmax over all, top-k, no renormalisation) is norm_topk_prob False. The
# top-k picks the same experts either way (softmax is monotonic). A layer is MoE in HF when its index is
# not in mlp_only_layers and (index + 1) % decoder_sparse_step == 0; Megatron's --moe-layer-freq N puts MoE
# at indices 0, N, 2N, ..., so exports write the pattern as mlp_only_layers with decoder_sparse_step 1,
# and imports give the pattern back as Megatron's list form. Dense layers use intermediate_size
# (--ffn-hidden-size), experts moe_intermediate_size (--moe-ffn-hidden-size); experts are stored
# per expert, as the Hub's checkpoints and transformers' save_pretrained write them:
# experts.{j}.gate_proj / up_proj / down_proj (imports also take transformers' in-memory fused form,
# gate_up_proj [E, 2 ffn, h] with [gate; up] rows and down_proj [E, h, ffn]).
strip_prefixes = llama.strip_prefixes
_OURS_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_HF_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")

LayerMap = Callable[[TensorSource, MegatronConfig, int], dict[str, torch.Tensor]]


# ---- megatron-lite -> HF ------------------------------------------------------------------------------


def check_moe_exportable(cfg: MegatronConfig, target: str, config_class: type, family: str) -> None:
    """UserError naming the first MoE option a Qwen MoE router (softmax, top-k, optional renormalisation,
    no bias) cannot express."""
    llama.check_llama_layout(cfg, target, config_class)
    problems = {
        "--disable-bias-linear is off (its MLP and router have no biases)": cfg.add_bias_linear,
        "--moe-router-score-function sigmoid": cfg.moe_router_score_function != "softmax",
        "--moe-router-topk-scaling-factor": cfg.moe_router_topk_scaling_factor not in (None, 1.0),
        "group-limited routing": cfg.moe_router_group_topk is not None,
        "--moe-router-enable-expert-bias": cfg.moe_router_enable_expert_bias,
        "--moe-expert-capacity-factor (token dropping)": cfg.moe_expert_capacity_factor is not None,
        "--window-size": sliding_window(cfg) is not None,
    }
    for what, present in problems.items():
        if present:
            fail(f"{target}: {what} has no {family} equivalent")


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a Qwen3MoeForCausalLM cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    check_moe_exportable(cfg, target, transformers.Qwen3MoeConfig, "Qwen3-MoE")
    if cfg.moe_shared_expert_intermediate_size is not None:
        fail(
            f"{target}: --moe-shared-expert-intermediate-size has no Qwen3-MoE equivalent (Qwen2-MoE has "
            "shared experts, but no q/k norms: drop --qk-layernorm for it)"
        )


def moe_config_values(cfg: MegatronConfig) -> dict[str, Any]:
    """The MoE keys Qwen3MoeConfig and Qwen2MoeConfig share."""
    pattern = parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)
    return {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "norm_topk_prob": not cfg.moe_router_pre_softmax,
        "router_aux_loss_coef": aux_loss_coeff(cfg, "aux_loss"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
        "use_sliding_window": False,
    }


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers Qwen3MoeConfig of this model."""
    config_class = transformers.Qwen3MoeConfig
    values = llama.base_config_values(cfg, config_class, HF_ARCHITECTURE, dtype, eos, extra)
    values.update(moe_config_values(cfg), attention_bias=cfg.qkv_bias)
    return make_hf_config(config_class, **values)


def routed_experts_to_hf(src: TensorSource, cfg: MegatronConfig, layer: int) -> dict[str, torch.Tensor]:
    """One MoE layer's router and experts, under HF's model.layers.{layer}.mlp. names (per expert)."""
    h, ffn, e = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    ours, hf = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
    out = {hf + "gate.weight": src.take(ours + "router.weight", (e, h))}
    for j in range(e):
        gate, up = src.take(ours + f"experts.local_experts.{j}.linear_fc1.weight", (2 * ffn, h)).chunk(2)
        out[hf + f"experts.{j}.gate_proj.weight"] = gate
        out[hf + f"experts.{j}.up_proj.weight"] = up
        out[hf + f"experts.{j}.down_proj.weight"] = src.take(
            ours + f"experts.local_experts.{j}.linear_fc2.weight", (h, ffn)
        )
    return out


def moe_weights_to_hf(src: TensorSource, cfg: MegatronConfig, moe_layer: LayerMap) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> a Llama-layout state dict whose MoE layers (by --moe-layer-freq) hold
    moe_layer's tensors in place of the dense MLP."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    pattern = parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)
    moe_layers = [i for i, moe in enumerate(pattern) if moe]
    drop_other_kind_of_mlp(src, pattern)
    experts: dict[str, torch.Tensor] = {}
    for i in moe_layers:
        experts.update(moe_layer(src, cfg, i))
        # Llama's converter maps a dense MLP in every layer: give it one to take, then drop what it makes.
        src.tensors[f"decoder.layers.{i}.{_OURS_MLP[0]}"] = torch.zeros(2 * ffn, h)
        src.tensors[f"decoder.layers.{i}.{_OURS_MLP[1]}"] = torch.zeros(h, ffn)
    out = llama.weights_to_hf(src, cfg)
    for i in moe_layers:
        for name in _HF_MLP:
            del out[f"model.layers.{i}.{name}"]
        for name in _OURS_MLP:
            del src.tensors[f"decoder.layers.{i}.{name}"]
            src.taken.discard(f"decoder.layers.{i}.{name}")
    out.update(experts)
    return out


def drop_other_kind_of_mlp(src: TensorSource, pattern: list[int]) -> None:
    """Forget a dense layer's MoE tensors and an MoE layer's dense MLP tensors.

    A checkpoint in Megatron's layout stores each parameter name stacked over all layers, so a model that
    mixes dense and MoE layers reads back with a (meaningless) router at the dense layers and a dense
    MLP at the MoE layers; the model has neither.
    """
    for name in list(src.tensors):
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["decoder", "layers"] or parts[3] != "mlp":
            continue
        is_moe_tensor = parts[4] in ("router", "experts", "shared_experts")
        if is_moe_tensor != bool(pattern[int(parts[2])]):
            del src.tensors[name]


def weights_to_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> Qwen3MoeForCausalLM's state dict."""
    return moe_weights_to_hf(src, cfg, routed_experts_to_hf)


# ---- HF -> megatron-lite ------------------------------------------------------------------------------


def moe_config_from_hf(hf: Any, target: str) -> dict[str, Any]:
    """MegatronConfig MoE fields of a Qwen3MoeConfig or Qwen2MoeConfig."""
    if getattr(hf, "use_sliding_window", False):
        fail(f"{target}: use_sliding_window (megatron-lite's MoE export/import has no sliding window yet)")
    if not hf.num_experts:
        fail(f"{target}: num_experts {hf.num_experts} is a dense model; megatron-lite imports it as MoE only")
    step = int(hf.decoder_sparse_step or 1)
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(hf.num_hidden_layers)]
    if not any(pattern):
        fail(f"{target}: decoder_sparse_step {step} and mlp_only_layers leave no MoE layer")
    return {
        "num_experts": hf.num_experts,
        "moe_ffn_hidden_size": hf.moe_intermediate_size,
        "moe_router_topk": hf.num_experts_per_tok,
        "moe_router_pre_softmax": not hf.norm_topk_prob,
        "moe_layer_freq": 1 if all(pattern) else "[" + ",".join(map(str, pattern)) + "]",
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    }


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a Qwen3MoeConfig; UserError for what megatron-lite cannot compute."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    values = llama.base_config_from_hf(hf, target)
    values.update(llama.bias_fields(bool(getattr(hf, "attention_bias", False)), False), qk_layernorm=True)
    values.update(moe_config_from_hf(hf, target))
    return values


def routed_experts_from_hf(src: TensorSource, cfg: MegatronConfig, layer: int) -> dict[str, torch.Tensor]:
    """One HF MoE layer's router and experts (prefixes stripped; per expert, or fused as transformers
    holds them in memory) -> megatron-lite's per-expert names."""
    h, ffn, e = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    ours, hf = f"decoder.layers.{layer}.mlp.", f"layers.{layer}.mlp."
    out = {ours + "router.weight": src.take(hf + "gate.weight", (e, h))}
    fused = src.has(hf + "experts.gate_up_proj")
    if fused:
        gate_up = src.take(hf + "experts.gate_up_proj", (e, 2 * ffn, h))
        down = src.take(hf + "experts.down_proj", (e, h, ffn))
    for j in range(e):
        fc1 = ours + f"experts.local_experts.{j}.linear_fc1.weight"
        fc2 = ours + f"experts.local_experts.{j}.linear_fc2.weight"
        if fused:
            out[fc1], out[fc2] = gate_up[j].clone(), down[j].clone()
            continue
        expert = hf + f"experts.{j}."
        gate = src.take(expert + "gate_proj.weight", (ffn, h))
        up = src.take(expert + "up_proj.weight", (ffn, h))
        out[fc1] = torch.cat((gate, up))
        out[fc2] = src.take(expert + "down_proj.weight", (h, ffn))
    return out


def moe_weights_from_hf(
    src: TensorSource, cfg: MegatronConfig, moe_layer: LayerMap
) -> dict[str, torch.Tensor]:
    """A Llama-layout state dict with MoE layers (prefixes stripped) -> full megatron-lite tensors."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    moe_layers = [i for i, moe in enumerate(parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)) if moe]
    experts: dict[str, torch.Tensor] = {}
    for i in moe_layers:
        experts.update(moe_layer(src, cfg, i))
        for name, shape in zip(_HF_MLP, ((ffn, h), (ffn, h), (h, ffn))):
            src.tensors[f"layers.{i}.{name}"] = torch.zeros(shape)
    out = llama.weights_from_hf(src, cfg)
    for i in moe_layers:
        for name in _OURS_MLP:
            del out[f"decoder.layers.{i}.{name}"]
        for name in _HF_MLP:
            del src.tensors[f"layers.{i}.{name}"]
            src.taken.discard(f"layers.{i}.{name}")
    out.update(experts)
    return out


def weights_from_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """A Qwen3MoeForCausalLM state dict (prefixes stripped) -> full megatron-lite tensors for cfg."""
    return moe_weights_from_hf(src, cfg, routed_experts_from_hf)
