"""The tensors of megatron-lite's multi-latent attention + MoE models <-> HuggingFace DeepseekV3ForCausalLM."""

from __future__ import annotations

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.config.moe_checks import parse_moe_layer_freq
from megatron_lite.convert.common import TensorSource, output_layer_from_hf, take_norm_scale

# MLA maps one to one: q_proj / q_a_proj + q_a_layernorm + q_b_proj are linear_q_proj / linear_q_down_proj +
# q_layernorm + linear_q_up_proj, both with per-head rows [nope | rope]; kv_a_proj_with_mqa is
# linear_kv_down_proj ([kv_lora_rank | rope] rows), kv_a_layernorm kv_layernorm, kv_b_proj linear_kv_up_proj
# (per-head rows [k | v]), o_proj linear_proj. Megatron's MLA rotates de-interleaved channels (x0, x2, ..,
# x1, x3, ..) half against half, which is HF's rope_interleave=True: the rope rows need no permutation.
# A rope_interleave=False checkpoint rotates its rows as stored, so its rope rows are interleaved on import.
# Routed experts are stored per expert (experts.{j}.gate_proj / up_proj / down_proj, the layout of
# DeepSeek's checkpoints, which transformers 5 also writes); an import also takes transformers 5's fused
# gate_up_proj [E, 2 ffn, h] ([gate; up] rows, our linear_fc1) and down_proj [E, h, ffn]. The router's
# e_score_correction_bias is our expert_bias buffer.


def moe_pattern(cfg: MegatronConfig) -> list[int]:
    """1 for each MoE layer, 0 for each dense one (all dense without --num-experts)."""
    if cfg.num_experts is None:
        return [0] * cfg.num_layers
    return parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)


def interleave_rope_rows(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Rows [heads * head_dim, ...] whose last rope_dim rows per head are rotated half against half as stored
    (HF rope_interleave=False) -> the order MLA's de-interleaving turns into exactly that: row 2i <- i and
    row 2i+1 <- i + rope_dim/2 of each head's rope part."""
    half = rope_dim // 2
    order = torch.stack((torch.arange(half), torch.arange(half, rope_dim)), dim=1).reshape(-1)
    heads = rows.shape[0] // head_dim
    grouped = rows.reshape(heads, head_dim, *rows.shape[1:]).clone()
    grouped[:, head_dim - rope_dim :] = grouped[:, head_dim - rope_dim :][:, order]
    return grouped.reshape(rows.shape)


def _shared_size(cfg: MegatronConfig) -> int:
    return cfg.moe_shared_expert_intermediate_size or 0


# ---- megatron-lite -> HF ------------------------------------------------------------------------------


def _attention_to_hf(src: TensorSource, cfg: MegatronConfig, ours: str, hf: str) -> dict[str, torch.Tensor]:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    q_dim, kv, rope = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim, cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim
    out = {}
    if cfg.q_lora_rank is None:
        out[hf + "q_proj.weight"] = src.take(ours + "linear_q_proj.weight", (n * q_dim, h))
    else:
        r = cfg.q_lora_rank
        out[hf + "q_a_proj.weight"] = src.take(ours + "linear_q_down_proj.weight", (r, h))
        out[hf + "q_a_layernorm.weight"] = take_norm_scale(src, ours + "q_layernorm.weight", r, cfg)
        out[hf + "q_b_proj.weight"] = src.take(ours + "linear_q_up_proj.weight", (n * q_dim, r))
    out[hf + "kv_a_proj_with_mqa.weight"] = src.take(ours + "linear_kv_down_proj.weight", (kv + rope, h))
    out[hf + "kv_a_layernorm.weight"] = take_norm_scale(src, ours + "kv_layernorm.weight", kv, cfg)
    out[hf + "kv_b_proj.weight"] = src.take(
        ours + "linear_kv_up_proj.weight", (n * (cfg.qk_head_dim + cfg.v_head_dim), kv)
    )
    out[hf + "o_proj.weight"] = src.take(ours + "linear_proj.weight", (h, n * cfg.v_head_dim))
    return out


def _mlp_to_hf(src: TensorSource, ours: str, hf: str, h: int, ffn: int) -> dict[str, torch.Tensor]:
    gate, up = src.take(ours + "linear_fc1.weight", (2 * ffn, h)).chunk(2)
    down = src.take(ours + "linear_fc2.weight", (h, ffn))
    return {hf + "gate_proj.weight": gate, hf + "up_proj.weight": up, hf + "down_proj.weight": down}


def _moe_to_hf(src: TensorSource, cfg: MegatronConfig, ours: str, hf: str) -> dict[str, torch.Tensor]:
    h, ffn, e = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    out = {hf + "gate.weight": src.take(ours + "router.weight", (e, h))}
    bias = ours + "router.expert_bias"
    out[hf + "gate.e_score_correction_bias"] = src.take(bias, (e,)) if src.has(bias) else torch.zeros(e)
    for j in range(e):
        expert = ours + f"experts.local_experts.{j}."
        out.update(_mlp_to_hf(src, expert, hf + f"experts.{j}.", h, ffn))
    shared = _shared_size(cfg)
    if shared:
        out.update(_mlp_to_hf(src, ours + "shared_experts.", hf + "shared_experts.", h, shared))
    else:  # n_shared_experts 0: HF still holds the (empty) shared MLP
        out.update({hf + f"shared_experts.{p}_proj.weight": torch.zeros(0, h) for p in ("gate", "up")})
        out[hf + "shared_experts.down_proj.weight"] = torch.zeros(h, 0)
    return out


def weights_to_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> DeepseekV3ForCausalLM's state dict (no lm_head.weight when tied)."""
    h = cfg.hidden_size
    out = {"model.embed_tokens.weight": src.take("embedding.word_embeddings.weight", (cfg.vocab_size, h))}
    for i, is_moe in enumerate(moe_pattern(cfg)):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = take_norm_scale(src, ours + "input_layernorm.weight", h, cfg)
        out.update(_attention_to_hf(src, cfg, ours + "self_attention.", hf + "self_attn."))
        out[hf + "post_attention_layernorm.weight"] = take_norm_scale(
            src, ours + "pre_mlp_layernorm.weight", h, cfg
        )
        if is_moe:
            out.update(_moe_to_hf(src, cfg, ours + "mlp.", hf + "mlp."))
        else:
            out.update(_mlp_to_hf(src, ours + "mlp.", hf + "mlp.", h, cfg.ffn_hidden_size))
    out["model.norm.weight"] = take_norm_scale(src, "decoder.final_layernorm.weight", h, cfg)
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = src.take("output_layer.weight", (cfg.vocab_size, h))
    return out


# ---- HF -> megatron-lite ------------------------------------------------------------------------------


def _attention_from_hf(
    src: TensorSource, cfg: MegatronConfig, hf: str, ours: str, interleave: bool
) -> dict[str, torch.Tensor]:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    q_dim, kv, rope = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim, cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim

    def rope_order(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
        return interleave_rope_rows(rows, head_dim, rope) if interleave else rows

    out = {}
    if cfg.q_lora_rank is None:
        out[ours + "linear_q_proj.weight"] = rope_order(src.take(hf + "q_proj.weight", (n * q_dim, h)), q_dim)
    else:
        r = cfg.q_lora_rank
        out[ours + "linear_q_down_proj.weight"] = src.take(hf + "q_a_proj.weight", (r, h))
        out[ours + "q_layernorm.weight"] = src.take(hf + "q_a_layernorm.weight", (r,))
        q_up = src.take(hf + "q_b_proj.weight", (n * q_dim, r))
        out[ours + "linear_q_up_proj.weight"] = rope_order(q_up, q_dim)
    kv_down = src.take(hf + "kv_a_proj_with_mqa.weight", (kv + rope, h))
    out[ours + "linear_kv_down_proj.weight"] = rope_order(kv_down, kv + rope)
    out[ours + "kv_layernorm.weight"] = src.take(hf + "kv_a_layernorm.weight", (kv,))
    out[ours + "linear_kv_up_proj.weight"] = src.take(
        hf + "kv_b_proj.weight", (n * (cfg.qk_head_dim + cfg.v_head_dim), kv)
    )
    out[ours + "linear_proj.weight"] = src.take(hf + "o_proj.weight", (h, n * cfg.v_head_dim))
    return out


def _mlp_from_hf(src: TensorSource, hf: str, ours: str, h: int, ffn: int) -> dict[str, torch.Tensor]:
    gate = src.take(hf + "gate_proj.weight", (ffn, h))
    up = src.take(hf + "up_proj.weight", (ffn, h))
    return {
        ours + "linear_fc1.weight": torch.cat((gate, up)),
        ours + "linear_fc2.weight": src.take(hf + "down_proj.weight", (h, ffn)),
    }


def _moe_from_hf(src: TensorSource, cfg: MegatronConfig, hf: str, ours: str) -> dict[str, torch.Tensor]:
    h, ffn, e = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    out = {ours + "router.weight": src.take(hf + "gate.weight", (e, h))}
    out[ours + "router.expert_bias"] = src.take(hf + "gate.e_score_correction_bias", (e,))
    if src.has(hf + "experts.gate_up_proj"):  # transformers 5's fused in-memory layout
        gate_up = src.take(hf + "experts.gate_up_proj", (e, 2 * ffn, h))
        down = src.take(hf + "experts.down_proj", (e, h, ffn))
        for j in range(e):
            out[ours + f"experts.local_experts.{j}.linear_fc1.weight"] = gate_up[j].clone()
            out[ours + f"experts.local_experts.{j}.linear_fc2.weight"] = down[j].clone()
    else:
        for j in range(e):
            expert = ours + f"experts.local_experts.{j}."
            out.update(_mlp_from_hf(src, hf + f"experts.{j}.", expert, h, ffn))
    shared = _mlp_from_hf(src, hf + "shared_experts.", ours + "shared_experts.", h, _shared_size(cfg))
    if _shared_size(cfg):
        out.update(shared)
    return out


def weights_from_hf(
    src: TensorSource, cfg: MegatronConfig, rope_interleave: bool = True
) -> dict[str, torch.Tensor]:
    """A DeepseekV3ForCausalLM state dict (prefixes stripped) -> full megatron-lite tensors for cfg.

    Multi-token-prediction layers (layers.{num_layers}.., which HF's model does not run either) are left out.
    """
    h = cfg.hidden_size
    out = {"embedding.word_embeddings.weight": src.take("embed_tokens.weight", (cfg.vocab_size, h))}
    for i, is_moe in enumerate(moe_pattern(cfg)):
        ours, hf = f"decoder.layers.{i}.", f"layers.{i}."
        out[ours + "input_layernorm.weight"] = src.take(hf + "input_layernorm.weight", (h,))
        out.update(
            _attention_from_hf(src, cfg, hf + "self_attn.", ours + "self_attention.", not rope_interleave)
        )
        out[ours + "pre_mlp_layernorm.weight"] = src.take(hf + "post_attention_layernorm.weight", (h,))
        if is_moe:
            out.update(_moe_from_hf(src, cfg, hf + "mlp.", ours + "mlp."))
        else:
            out.update(_mlp_from_hf(src, hf + "mlp.", ours + "mlp.", h, cfg.ffn_hidden_size))
    out["decoder.final_layernorm.weight"] = src.take("norm.weight", (h,))
    out.update(output_layer_from_hf(src, cfg))
    for name in src.unused():
        parts = name.split(".")
        if parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= cfg.num_layers:
            src.take(name)  # an MTP module
    return out
