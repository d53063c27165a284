"""LLaMA-style models (RMSNorm, RoPE, SwiGLU, GQA) <-> HuggingFace LlamaForCausalLM, and the Llama layout
of weights and config keys that Qwen3ForCausalLM and MistralForCausalLM share."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.convert.common import (
    TensorSource,
    config_accepts,
    dtype_field,
    make_hf_config,
    merge_qkv,
    output_layer_from_hf,
    split_qkv,
    take_norm_scale,
)
from megatron_lite.convert.rope import (
    check_rope_exportable,
    rope_config_values,
    rope_from_hf,
    rotate_half_rows,
)
from megatron_lite.errors import fail

HF_ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"

# RoPE: megatron-lite rotates each head's [first half, second half] channel pairs (rotate-half, not
# interleaved) with inv_freq = base^(-2i/d), exactly as HF Llama's rotate_half does, so q and k rows
# need no permutation in either direction. (Meta's original checkpoints are interleaved; HF's own
# converter permutes those, which is why HF-format weights are already in rotate-half order.) A model
# trained with --rotary-interleaved is exported with its q and k rows permuted into that order.


# ---- megatron-lite -> HF ------------------------------------------------------------------------------


def check_llama_layout(cfg: MegatronConfig, target: str, config_class: type) -> None:
    """UserError naming the first option the Llama layout (Llama, Qwen3, Mistral) cannot express."""
    if not cfg.swiglu:
        fail(f"{target}: --swiglu is off, but Llama's MLP is always gated SiLU (SwiGLU)")
    check_rope_exportable(cfg, target)
    if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size and not config_accepts(
        config_class, "head_dim"
    ):
        fail(
            f"{target}: --kv-channels {cfg.kv_channels} differs from --hidden-size / --num-attention-heads "
            f"and this transformers version's {config_class.__name__} has no head_dim; upgrade transformers"
        )


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a LlamaForCausalLM (in this transformers version) cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    config_class = transformers.LlamaConfig
    check_llama_layout(cfg, target, config_class)
    if cfg.add_bias_linear and not config_accepts(config_class, "mlp_bias"):
        fail(
            f"{target}: the model has linear biases (no --disable-bias-linear) and this transformers "
            "version's LlamaConfig has no mlp_bias; upgrade transformers (>= 4.41)"
        )


def base_config_values(
    cfg: MegatronConfig, config_class: type, architecture: str, dtype: str, eos: int | None, extra: dict
) -> dict[str, Any]:
    """The config keys every Llama-layout family shares."""
    values: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "attention_dropout": cfg.attention_dropout,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
        dtype_field(config_class): dtype,
        **rope_config_values(cfg, config_class),
        **extra,
    }
    if config_accepts(config_class, "head_dim"):
        values["head_dim"] = cfg.kv_channels
    return values


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers LlamaConfig of this model."""
    config_class = transformers.LlamaConfig
    values = base_config_values(cfg, config_class, HF_ARCHITECTURE, dtype, eos, extra)
    # Llama has one switch for the q/k/v/o biases: any of them on exports all four (zeros where absent).
    values["attention_bias"] = cfg.qkv_bias or cfg.add_bias_linear
    if config_accepts(config_class, "mlp_bias"):
        values["mlp_bias"] = cfg.add_bias_linear
    return make_hf_config(config_class, **values)


def weights_to_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> the Llama layout's state dict (no lm_head.weight when tied).

    Norm scales are 1 + w under --apply-layernorm-1p; with --rotary-interleaved the q and k rows (and
    the q/k norms' channels) are permuted into rotate-half order; --qk-layernorm gives Qwen3's
    self_attn.q_norm / k_norm.
    """
    h, ffn, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    attention_bias, mlp_bias = cfg.qkv_bias or cfg.add_bias_linear, cfg.add_bias_linear

    def rope_order(rows: torch.Tensor) -> torch.Tensor:
        return rotate_half_rows(rows, d) if cfg.rotary_interleaved else rows

    out = {"model.embed_tokens.weight": src.take("embedding.word_embeddings.weight", (cfg.vocab_size, h))}
    for i in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = take_norm_scale(src, ours + "input_layernorm.weight", h, cfg)
        qkv = src.take(ours + "self_attention.linear_qkv.weight", ((heads + 2 * groups) * d, h))
        q, k, v = split_qkv(qkv, heads, groups, d)
        out[hf + "self_attn.q_proj.weight"] = rope_order(q)
        out[hf + "self_attn.k_proj.weight"] = rope_order(k)
        out[hf + "self_attn.v_proj.weight"] = v
        out[hf + "self_attn.o_proj.weight"] = src.take(
            ours + "self_attention.linear_proj.weight", (h, heads * d)
        )
        if attention_bias:
            qkv_bias = src.take_bias(
                ours + "self_attention.linear_qkv.bias", (heads + 2 * groups) * d, cfg.qkv_bias
            )
            q, k, v = split_qkv(qkv_bias, heads, groups, d)
            out[hf + "self_attn.q_proj.bias"] = rope_order(q)
            out[hf + "self_attn.k_proj.bias"] = rope_order(k)
            out[hf + "self_attn.v_proj.bias"] = v
            out[hf + "self_attn.o_proj.bias"] = src.take_bias(
                ours + "self_attention.linear_proj.bias", h, cfg.add_bias_linear
            )
        if cfg.qk_layernorm:
            for which in ("q", "k"):
                scale = take_norm_scale(src, ours + f"self_attention.{which}_layernorm.weight", d, cfg)
                out[hf + f"self_attn.{which}_norm.weight"] = rope_order(scale)
        out[hf + "post_attention_layernorm.weight"] = take_norm_scale(
            src, ours + "pre_mlp_layernorm.weight", h, cfg
        )
        # fc1's rows are [gate; up] (see MLP); Llama keeps them as two matrices.
        gate, up = src.take(ours + "mlp.linear_fc1.weight", (2 * ffn, h)).chunk(2)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
        out[hf + "mlp.down_proj.weight"] = src.take(ours + "mlp.linear_fc2.weight", (h, ffn))
        if mlp_bias:
            gate, up = src.take(ours + "mlp.linear_fc1.bias", (2 * ffn,)).chunk(2)
            out[hf + "mlp.gate_proj.bias"] = gate
            out[hf + "mlp.up_proj.bias"] = up
            out[hf + "mlp.down_proj.bias"] = src.take(ours + "mlp.linear_fc2.bias", (h,))
    out["model.norm.weight"] = take_norm_scale(src, "decoder.final_layernorm.weight", h, cfg)
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = src.take("output_layer.weight", (cfg.vocab_size, h))
    return out


# ---- HF -> megatron-lite ------------------------------------------------------------------------------


def base_config_from_hf(hf: Any, target: str) -> dict[str, Any]:
    """MegatronConfig model fields every Llama-layout family shares (no biases, no window, no q/k norms)."""
    if hf.hidden_act != "silu":
        fail(f"{target}: hidden_act {hf.hidden_act!r} is not 'silu', the SwiGLU gate megatron-lite computes")
    heads = hf.num_attention_heads
    groups = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return {
        "num_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "num_attention_heads": heads,
        "group_query_attention": groups != heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "ffn_hidden_size": hf.intermediate_size,
        "max_position_embeddings": hf.max_position_embeddings,
        "position_embedding_type": "rope",
        **rope_from_hf(hf, target),
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


def bias_fields(attention_bias: bool, mlp_bias: bool) -> dict[str, Any]:
    """Megatron's switches for HF's attention_bias / mlp_bias: linear biases (proj, fc1, fc2, and qkv unless
    --disable-qkv-bias) and a separate QKV bias. An o_proj bias without MLP biases has no place: it must
    be zero."""
    return {
        "add_bias_linear": mlp_bias,
        "add_qkv_bias": attention_bias and not mlp_bias,
        "disable_qkv_bias": mlp_bias and not attention_bias,
    }


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a LlamaConfig; UserError for what megatron-lite's model cannot compute."""
    values = base_config_from_hf(hf, f"cannot import this {HF_ARCHITECTURE}")
    values.update(
        bias_fields(bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False)))
    )
    return values


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama-layout keys without "model." (base-model files have none); old inv_freq buffers dropped."""
    return {
        key.removeprefix("model."): tensor
        for key, tensor in state.items()
        if not key.endswith("rotary_emb.inv_freq")
    }


def weights_from_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """A Llama-layout state dict (prefixes stripped) -> full megatron-lite tensors for cfg (with Qwen3's
    q_norm / k_norm when cfg has --qk-layernorm)."""
    h, ffn, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups

    out = {"embedding.word_embeddings.weight": src.take("embed_tokens.weight", (cfg.vocab_size, h))}
    for i in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"layers.{i}."
        out[ours + "input_layernorm.weight"] = src.take(hf + "input_layernorm.weight", (h,))
        q = src.take(hf + "self_attn.q_proj.weight", (heads * d, h))
        k = src.take(hf + "self_attn.k_proj.weight", (groups * d, h))
        v = src.take(hf + "self_attn.v_proj.weight", (groups * d, h))
        out[ours + "self_attention.linear_qkv.weight"] = merge_qkv(q, k, v, heads, groups, d)
        if cfg.qkv_bias:
            q = src.take(hf + "self_attn.q_proj.bias", (heads * d,))
            k = src.take(hf + "self_attn.k_proj.bias", (groups * d,))
            v = src.take(hf + "self_attn.v_proj.bias", (groups * d,))
            out[ours + "self_attention.linear_qkv.bias"] = merge_qkv(q, k, v, heads, groups, d)
        if cfg.qk_layernorm:
            for which in ("q", "k"):
                out[ours + f"self_attention.{which}_layernorm.weight"] = src.take(
                    hf + f"self_attn.{which}_norm.weight", (d,)
                )
        out[ours + "self_attention.linear_proj.weight"] = src.take(
            hf + "self_attn.o_proj.weight", (h, heads * d)
        )
        if cfg.add_bias_linear:
            # Megatron's switches cannot always leave out exactly the biases Llama leaves out; a bias
            # megatron-lite has and Llama lacks is zero, the same function.
            o_bias = hf + "self_attn.o_proj.bias"
            out[ours + "self_attention.linear_proj.bias"] = src.take_bias(o_bias, h, src.has(o_bias))
        out[ours + "pre_mlp_layernorm.weight"] = src.take(hf + "post_attention_layernorm.weight", (h,))
        gate = src.take(hf + "mlp.gate_proj.weight", (ffn, h))
        up = src.take(hf + "mlp.up_proj.weight", (ffn, h))
        out[ours + "mlp.linear_fc1.weight"] = torch.cat((gate, up))
        out[ours + "mlp.linear_fc2.weight"] = src.take(hf + "mlp.down_proj.weight", (h, ffn))
        if cfg.add_bias_linear:
            gate = src.take(hf + "mlp.gate_proj.bias", (ffn,))
            up = src.take(hf + "mlp.up_proj.bias", (ffn,))
            out[ours + "mlp.linear_fc1.bias"] = torch.cat((gate, up))
            out[ours + "mlp.linear_fc2.bias"] = src.take(hf + "mlp.down_proj.bias", (h,))
    out["decoder.final_layernorm.weight"] = src.take("norm.weight", (h,))
    out.update(output_layer_from_hf(src, cfg))
    return out
