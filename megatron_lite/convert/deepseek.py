"""Multi-latent attention models with sigmoid-routed MoE layers and shared experts (DeepSeek-V3 style)
<-> HuggingFace DeepseekV3ForCausalLM: the config both ways and what it cannot express."""

from __future__ import annotations

import math
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.convert import llama
from megatron_lite.convert.common import dtype_field, make_hf_config
from megatron_lite.convert.deepseek_weights import moe_pattern, weights_from_hf, weights_to_hf
from megatron_lite.core.models.gpt.multi_latent_attention import (
    MLA_BETA_FAST,
    MLA_BETA_SLOW,
    MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS,
    mla_rotary_embedding,
    mla_softmax_scale,
)
from megatron_lite.errors import fail

HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
__all__ = ["weights_from_hf", "weights_to_hf"]

# HF's router: sigmoid scores; the top-k chosen on score + e_score_correction_bias inside the topk_group
# of n_group groups ranked by the sum of their top-2 biased scores; the chosen scores renormalised
# (norm_topk_prob) and times routed_scaling_factor. Megatron's sigmoid router does the same with
# --moe-router-enable-expert-bias, ranking groups by their top topk/group_topk scores and renormalising
# whenever topk > 1. HF's q_a_layernorm and kv_a_layernorm have eps 1e-6 whatever rms_norm_eps says;
# megatron-lite's norms share --norm-epsilon, so both must be 1e-6.
HF_LATENT_NORM_EPS = 1e-6
# DeepSeek-V3's complementary sequence-wise balance loss (alpha = 1e-4 in its paper) is a training setting
# HF's config does not carry; an import trains with it, beside the expert bias.
IMPORTED_BALANCING = {"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 1e-4}
strip_prefixes = llama.strip_prefixes


def weight_options(hf: Any) -> dict[str, Any]:
    """What weights_from_hf needs from the HF config beyond megatron-lite's: the stored rope layout."""
    return {"rope_interleave": bool(getattr(hf, "rope_interleave", True))}


# ---- megatron-lite -> HF ------------------------------------------------------------------------------


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a DeepseekV3ForCausalLM cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    pattern = moe_pattern(cfg)
    dense = pattern.count(0)
    problems = {
        "--normalization must be RMSNorm": cfg.normalization != "RMSNorm",
        "--swiglu is off (DeepSeek's MLPs are gated SiLU)": not cfg.swiglu,
        "--disable-bias-linear is off (DeepSeek-V3 has no MLP or router biases)": cfg.add_bias_linear,
        "--position-embedding-type learned_absolute has no place (MLA rotates its own channels)": (
            cfg.position_embedding_type == "learned_absolute"
        ),
        "--qk-layernorm is off, but HF always normalises the q and kv latents": not cfg.qk_layernorm,
        f"--norm-epsilon {cfg.layernorm_epsilon}: HF's latent norms use {HF_LATENT_NORM_EPS}": (
            cfg.layernorm_epsilon != HF_LATENT_NORM_EPS
        ),
        "--rotary-percent below 1 (HF rotates all qk_pos_emb_head_dim channels)": (
            cfg.rope_type == "rope" and cfg.rotary_percent != 1.0
        ),
        "--moe-layer-freq: DeepSeek-V3's dense layers are the first first_k_dense_replace ones": (
            pattern != [0] * dense + [1] * (len(pattern) - dense)
        ),
    }
    if cfg.num_experts is not None:
        groups, group_topk, topk = cfg.moe_router_num_groups, cfg.moe_router_group_topk, cfg.moe_router_topk
        shared = cfg.moe_shared_expert_intermediate_size or 0
        problems.update(
            {
                "--moe-router-score-function softmax (DeepSeek-V3's router is sigmoid)": (
                    cfg.moe_router_score_function != "sigmoid"
                ),
                "--moe-expert-capacity-factor (HF drops no tokens)": cfg.moe_expert_capacity_factor
                is not None,
                "--moe-shared-expert-gate (DeepSeek-V3's shared experts are ungated)": cfg.moe_shared_expert_gate,
                "--moe-shared-expert-intermediate-size that is not a multiple of --moe-ffn-hidden-size": (
                    shared % cfg.moe_ffn_hidden_size != 0
                ),
                "fewer than 2 experts (HF ranks expert groups by their top 2)": cfg.num_experts < 2,
                "--moe-router-topk other than 2 x --moe-router-group-topk (HF ranks groups by their top 2 "
                "scores, Megatron by the top topk/group_topk)": groups is not None and topk != 2 * group_topk,
            }
        )
    for what, present in problems.items():
        if present:
            fail(f"{target}: {what}")


def _rope_parameters(cfg: MegatronConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.rope_type == "yarn" and cfg.rotary_scaling_factor > 1:  # YaRN with factor 1 is plain RoPE
        params.update(
            rope_type="yarn",
            factor=float(cfg.rotary_scaling_factor),
            original_max_position_embeddings=MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS,
            beta_fast=MLA_BETA_FAST,
            beta_slow=MLA_BETA_SLOW,
            mscale=float(cfg.mscale),
            mscale_all_dim=float(cfg.mscale_all_dim),
        )
        if not (cfg.mscale and cfg.mscale_all_dim):
            # HF infers its cos/sin factor from factor alone then; Megatron's is mscale / mscale_all_dim's.
            params["attention_factor"] = mla_rotary_embedding(cfg).mscale
    return params


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers DeepseekV3Config of this model; checks HF computes the same RoPE and score scale."""
    config_class = transformers.DeepseekV3Config
    pattern, moe = moe_pattern(cfg), cfg.num_experts is not None
    ffn = cfg.moe_ffn_hidden_size if moe else cfg.ffn_hidden_size
    groups = cfg.moe_router_num_groups if moe and cfg.moe_router_num_groups else 1
    values = {
        "architectures": [HF_ARCHITECTURE],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "moe_intermediate_size": ffn,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": (cfg.moe_shared_expert_intermediate_size or 0) // ffn if moe else 0,
        "n_routed_experts": cfg.num_experts if moe else 2,
        "num_experts_per_tok": cfg.moe_router_topk if moe else 1,
        "routed_scaling_factor": float(cfg.moe_router_topk_scaling_factor or 1.0) if moe else 1.0,
        "n_group": groups,
        "topk_group": cfg.moe_router_group_topk if groups > 1 else 1,
        "norm_topk_prob": moe and cfg.moe_router_topk > 1,
        "first_k_dense_replace": pattern.count(0),
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_pos_emb_head_dim,
        "qk_nope_head_dim": cfg.qk_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "rope_parameters": _rope_parameters(cfg),
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "num_mtp_layers": 0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
        dtype_field(config_class): dtype,
        **extra,
    }
    config = make_hf_config(config_class, **values)
    _check_same_rope(cfg, config, f"cannot export to {HF_ARCHITECTURE}")
    return config


def _check_same_rope(ours: Any, hf: Any, target: str) -> None:
    """UserError unless HF's rotary frequencies, cos/sin factor and score scale are megatron-lite's (what
    HF computes is read from HF's own classes, so a formula that differs cannot pass unnoticed)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_modeling

    theirs = hf_modeling.DeepseekV3RotaryEmbedding(hf)
    mine = mla_rotary_embedding(ours)
    their_scale = hf_modeling.yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim**-0.5)
    same = (
        theirs.inv_freq.shape == mine.inv_freq(torch.device("cpu")).shape
        and torch.allclose(theirs.inv_freq, mine.inv_freq(torch.device("cpu")), rtol=1e-6, atol=0)
        and math.isclose(theirs.attention_scaling, mine.mscale, rel_tol=1e-6)
        and math.isclose(their_scale, mla_softmax_scale(ours), rel_tol=1e-6)
    )
    if not same:
        fail(
            f"{target}: HF's RoPE {dict(hf.rope_parameters)} computes other frequencies or scales than "
            f"megatron-lite's --rope-type {ours.rope_type} (YaRN: original max positions "
            f"{MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS}, beta {MLA_BETA_FAST:g}/{MLA_BETA_SLOW:g})"
        )


# ---- HF -> megatron-lite ------------------------------------------------------------------------------


def _rope_from_hf(hf: Any, target: str) -> dict[str, Any]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    theta = float(params.get("rope_theta", 10000.0))
    if theta != int(theta):
        fail(f"{target}: rope_theta {theta} is not a whole number, which --rotary-base must be")
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        fail(f"{target}: partial_rotary_factor {params['partial_rotary_factor']} is not supported")
    values: dict[str, Any] = {"rotary_base": int(theta), "rotary_percent": 1.0}
    if rope_type == "default":
        return {
            **values,
            "rope_type": "rope",
            "rotary_scaling_factor": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.0,
        }
    if rope_type != "yarn":
        fail(f"{target}: rope_type {rope_type!r} is not supported; MLA's RoPE is default or yarn")
    for key, ours in (
        ("original_max_position_embeddings", MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS),
        ("beta_fast", MLA_BETA_FAST),
        ("beta_slow", MLA_BETA_SLOW),
    ):
        if params.get(key) is not None and float(params[key]) != float(ours):
            fail(f"{target}: yarn {key} {params[key]} differs from Megatron's MLA value {ours:g}")
    factor = params.get("factor") or hf.max_position_embeddings / MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    return {
        **values,
        "rope_type": "yarn",
        "rotary_scaling_factor": float(factor),
        # HF uses mscale only beside mscale_all_dim; alone it takes the factor's own (mscale 1).
        "mscale": float(mscale) if mscale and mscale_all_dim else 1.0,
        "mscale_all_dim": float(mscale_all_dim or 0.0),
    }


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a DeepseekV3Config; UserError for what megatron-lite cannot compute."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    heads = hf.num_attention_heads
    checks = {
        f"hidden_act {hf.hidden_act!r} is not 'silu'": hf.hidden_act != "silu",
        "attention_bias (megatron-lite's MLA has no projection biases)": bool(hf.attention_bias),
        f"num_key_value_heads {hf.num_key_value_heads} differs from num_attention_heads {heads}": (
            (hf.num_key_value_heads or heads) != heads
        ),
        f"rms_norm_eps {hf.rms_norm_eps}: HF's latent norms use {HF_LATENT_NORM_EPS} and megatron-lite's "
        "norms share one epsilon": float(hf.rms_norm_eps) != HF_LATENT_NORM_EPS,
    }
    for what, present in checks.items():
        if present:
            fail(f"{target}: {what}")
    layers, dense = hf.num_hidden_layers, min(int(hf.first_k_dense_replace or 0), hf.num_hidden_layers)
    values: dict[str, Any] = {
        "num_layers": layers,
        "hidden_size": hf.hidden_size,
        "num_attention_heads": heads,
        "ffn_hidden_size": hf.intermediate_size,
        "max_position_embeddings": hf.max_position_embeddings,
        "position_embedding_type": "rope",
        "multi_latent_attention": True,
        "qk_layernorm": True,
        "q_lora_rank": hf.q_lora_rank,
        "kv_lora_rank": hf.kv_lora_rank,
        "qk_head_dim": hf.qk_nope_head_dim,
        "qk_pos_emb_head_dim": hf.qk_rope_head_dim,
        "v_head_dim": hf.v_head_dim,
        **_rope_from_hf(hf, target),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.rms_norm_eps),
        "swiglu": True,
        "untie_embeddings_and_output_weights": not getattr(hf, "tie_word_embeddings", False),
        "add_bias_linear": False,
        "attention_dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        "hidden_dropout": 0.0,
        "init_method_std": float(hf.initializer_range),
        "vocab_size": hf.vocab_size,
    }
    if dense < layers:
        values.update(_moe_from_hf(hf, target, layers, dense))
    _check_same_rope(SimpleNamespace(**values), hf, target)
    return values


def _moe_from_hf(hf: Any, target: str, layers: int, dense: int) -> dict[str, Any]:
    experts, topk = hf.n_routed_experts, hf.num_experts_per_tok
    groups, group_topk = int(hf.n_group or 1), int(hf.topk_group or 1)
    if bool(hf.norm_topk_prob) != (topk > 1):
        fail(
            f"{target}: norm_topk_prob {hf.norm_topk_prob} with num_experts_per_tok {topk}; Megatron's sigmoid "
            "router renormalises the chosen scores exactly when it routes to more than one expert"
        )
    limited = 1 < groups and group_topk < groups
    if limited and topk != 2 * group_topk:
        fail(
            f"{target}: num_experts_per_tok {topk} is not 2 x topk_group {group_topk}; HF ranks groups by "
            "their top-2 scores, Megatron's --moe-router-group-topk by the top topk/group_topk"
        )
    scaling = float(hf.routed_scaling_factor)
    shared = int(hf.n_shared_experts or 0) * hf.moe_intermediate_size
    return {
        "num_experts": experts,
        "moe_ffn_hidden_size": hf.moe_intermediate_size,
        "moe_layer_freq": 1 if dense == 0 else [0] * dense + [1] * (layers - dense),
        "moe_router_topk": topk,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,  # e_score_correction_bias: aux-loss-free balancing
        "moe_router_dtype": "fp32",  # HF scores in fp32 whatever the weights' dtype
        "moe_router_topk_scaling_factor": None if scaling == 1.0 else scaling,
        "moe_router_num_groups": groups if limited else None,
        "moe_router_group_topk": group_topk if limited else None,
        "moe_shared_expert_intermediate_size": shared or None,
        **IMPORTED_BALANCING,
    }
