"""GPT-2-style models (LayerNorm, learned positions, GELU or squared ReLU, tied) <-> HF GPT2LMHeadModel."""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.convert.common import (
    TensorSource,
    dtype_field,
    make_hf_config,
    merge_qkv,
    output_layer_from_hf,
    sliding_window,
    split_qkv,
    take_norm_scale,
)
from megatron_lite.errors import fail

HF_ARCHITECTURE = "GPT2LMHeadModel"
MODEL_TYPE = "gpt2"
# HF's activation_function names of the MLP activations megatron-lite computes: the exact GELU (Megatron's
# default), its tanh approximation (--openai-gelu; GPT-2's own "gelu_new") and relu(x)^2 (--squared-relu).
EXACT_GELUS = ("gelu", "gelu_python")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "gelu_python_tanh")
SQUARED_RELUS = ("relu2",)
# Old GPT-2 checkpoints store each layer's causal mask as a buffer; it is not a weight.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# GPT-2's Conv1D layers store their weight as [in, out], the transpose of a Linear's [out, in].


# ---- megatron-lite -> HF ------------------------------------------------------------------------------


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a GPT2LMHeadModel cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    if cfg.swiglu:
        fail(f"{target}: --swiglu is set, but GPT-2's MLP is plain GELU")
    if cfg.untie_embeddings_and_output_weights:
        fail(
            f"{target}: --untie-embeddings-and-output-weights is set, but GPT-2 always ties the output "
            "layer to the word embeddings"
        )
    if cfg.num_query_groups != cfg.num_attention_heads:
        fail(
            f"{target}: --group-query-attention with --num-query-groups {cfg.num_query_groups} "
            f"(of {cfg.num_attention_heads} heads) is set, but GPT-2 has no grouped-query attention"
        )
    if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
        fail(
            f"{target}: --kv-channels {cfg.kv_channels} x --num-attention-heads {cfg.num_attention_heads} "
            f"is not --hidden-size {cfg.hidden_size}, but GPT-2's heads always split the hidden size"
        )
    if cfg.qk_layernorm:
        fail(f"{target}: --qk-layernorm is set, but GPT-2 has no query/key norms")
    if sliding_window(cfg) is not None:
        fail(
            f"{target}: --window-size {cfg.window_size[0]},0 is set, but GPT-2 has no sliding-window attention"
        )


def activation_function(cfg: MegatronConfig) -> str:
    """GPT2Config.activation_function of cfg's MLP."""
    if cfg.squared_relu:
        return SQUARED_RELUS[0]
    return TANH_GELUS[0] if cfg.openai_gelu else EXACT_GELUS[0]


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers GPT2Config of this model."""
    config_class = transformers.GPT2Config
    return make_hf_config(
        config_class,
        architectures=[HF_ARCHITECTURE],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_hidden_size,
        activation_function=activation_function(cfg),
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        **{dtype_field(config_class): dtype},
        **extra,
    )


def weights_to_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Full megatron-lite tensors -> GPT2LMHeadModel's state dict (tied: no lm_head.weight)."""
    h, ffn, heads, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.kv_channels

    out = {
        "transformer.wte.weight": src.take("embedding.word_embeddings.weight", (cfg.vocab_size, h)),
        "transformer.wpe.weight": src.take(
            "embedding.position_embeddings.weight", (cfg.max_position_embeddings, h)
        ),
    }
    for i in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out[hf + "ln_1.weight"] = take_norm_scale(src, ours + "input_layernorm.weight", h, cfg)
        out[hf + "ln_1.bias"] = src.take(ours + "input_layernorm.bias", (h,))
        qkv = src.take(ours + "self_attention.linear_qkv.weight", (3 * h, h))
        out[hf + "attn.c_attn.weight"] = torch.cat(split_qkv(qkv, heads, heads, d)).t()
        qkv_bias = src.take_bias(ours + "self_attention.linear_qkv.bias", 3 * h, cfg.qkv_bias)
        out[hf + "attn.c_attn.bias"] = torch.cat(split_qkv(qkv_bias, heads, heads, d))
        out[hf + "attn.c_proj.weight"] = src.take(ours + "self_attention.linear_proj.weight", (h, h)).t()
        out[hf + "attn.c_proj.bias"] = src.take_bias(
            ours + "self_attention.linear_proj.bias", h, cfg.add_bias_linear
        )
        out[hf + "ln_2.weight"] = take_norm_scale(src, ours + "pre_mlp_layernorm.weight", h, cfg)
        out[hf + "ln_2.bias"] = src.take(ours + "pre_mlp_layernorm.bias", (h,))
        out[hf + "mlp.c_fc.weight"] = src.take(ours + "mlp.linear_fc1.weight", (ffn, h)).t()
        out[hf + "mlp.c_fc.bias"] = src.take_bias(ours + "mlp.linear_fc1.bias", ffn, cfg.add_bias_linear)
        out[hf + "mlp.c_proj.weight"] = src.take(ours + "mlp.linear_fc2.weight", (h, ffn)).t()
        out[hf + "mlp.c_proj.bias"] = src.take_bias(ours + "mlp.linear_fc2.bias", h, cfg.add_bias_linear)
    out["transformer.ln_f.weight"] = take_norm_scale(src, "decoder.final_layernorm.weight", h, cfg)
    out["transformer.ln_f.bias"] = src.take("decoder.final_layernorm.bias", (h,))
    return out


# ---- HF -> megatron-lite ------------------------------------------------------------------------------


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a GPT2Config; UserError for what megatron-lite's model cannot compute."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    activation = getattr(hf, "activation_function", "gelu_new")
    known = EXACT_GELUS + TANH_GELUS + SQUARED_RELUS
    if activation not in known:
        fail(
            f"{target}: activation_function {activation!r} is none of those megatron-lite's MLP computes "
            f"({', '.join(known)})"
        )
    if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        fail(
            f"{target}: scale_attn_weights false or scale_attn_by_inverse_layer_idx true changes the "
            "attention scale from 1/sqrt(head size), which megatron-lite always uses"
        )
    if getattr(hf, "add_cross_attention", False):
        fail(f"{target}: add_cross_attention is true; megatron-lite models are decoder-only")
    if hf.n_embd % hf.n_head != 0:
        fail(f"{target}: n_embd {hf.n_embd} is not divisible by n_head {hf.n_head}")
    return {
        "num_layers": hf.n_layer,
        "hidden_size": hf.n_embd,
        "num_attention_heads": hf.n_head,
        "ffn_hidden_size": hf.n_inner or 4 * hf.n_embd,
        "max_position_embeddings": hf.n_positions,
        "position_embedding_type": "learned_absolute",
        "normalization": "LayerNorm",
        "layernorm_epsilon": float(hf.layer_norm_epsilon),
        "untie_embeddings_and_output_weights": not getattr(hf, "tie_word_embeddings", True),
        "swiglu": False,
        "openai_gelu": activation in TANH_GELUS,
        "squared_relu": activation in SQUARED_RELUS,
        "add_bias_linear": True,
        "attention_dropout": float(hf.attn_pdrop),
        "hidden_dropout": float(hf.resid_pdrop),
        "init_method_std": float(hf.initializer_range),
        "vocab_size": hf.vocab_size,
    }


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel keys without "transformer." (GPT2Model files have none), mask buffers dropped."""
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if not _MASK_BUFFER.fullmatch(name):
            out[name] = tensor
    return out


def weights_from_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (prefixes stripped) -> full megatron-lite tensors for cfg."""
    h, ffn, heads, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.kv_channels
    out = {
        "embedding.word_embeddings.weight": src.take("wte.weight", (cfg.vocab_size, h)),
        "embedding.position_embeddings.weight": src.take("wpe.weight", (cfg.max_position_embeddings, h)),
    }
    for i in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"h.{i}."
        out[ours + "input_layernorm.weight"] = src.take(hf + "ln_1.weight", (h,))
        out[ours + "input_layernorm.bias"] = src.take(hf + "ln_1.bias", (h,))
        q, k, v = src.take(hf + "attn.c_attn.weight", (h, 3 * h)).t().split(h)
        out[ours + "self_attention.linear_qkv.weight"] = merge_qkv(q, k, v, heads, heads, d)
        q, k, v = src.take(hf + "attn.c_attn.bias", (3 * h,)).split(h)
        out[ours + "self_attention.linear_qkv.bias"] = merge_qkv(q, k, v, heads, heads, d)
        out[ours + "self_attention.linear_proj.weight"] = src.take(hf + "attn.c_proj.weight", (h, h)).t()
        out[ours + "self_attention.linear_proj.bias"] = src.take(hf + "attn.c_proj.bias", (h,))
        out[ours + "pre_mlp_layernorm.weight"] = src.take(hf + "ln_2.weight", (h,))
        out[ours + "pre_mlp_layernorm.bias"] = src.take(hf + "ln_2.bias", (h,))
        out[ours + "mlp.linear_fc1.weight"] = src.take(hf + "mlp.c_fc.weight", (h, ffn)).t()
        out[ours + "mlp.linear_fc1.bias"] = src.take(hf + "mlp.c_fc.bias", (ffn,))
        out[ours + "mlp.linear_fc2.weight"] = src.take(hf + "mlp.c_proj.weight", (ffn, h)).t()
        out[ours + "mlp.linear_fc2.bias"] = src.take(hf + "mlp.c_proj.bias", (h,))
    out["decoder.final_layernorm.weight"] = src.take("ln_f.weight", (h,))
    out["decoder.final_layernorm.bias"] = src.take("ln_f.bias", (h,))
    out.update(output_layer_from_hf(src, cfg))
    return out
