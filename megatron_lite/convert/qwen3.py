"""Llama-layout models with per-head q/k norms (--qk-layernorm) <-> HuggingFace Qwen3ForCausalLM."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from megatron_lite.config import MegatronConfig
from megatron_lite.convert import llama
from megatron_lite.convert.common import make_hf_config, sliding_window, window_size_from_hf
from megatron_lite.errors import fail

HF_ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"

# Qwen3 is Llama's layout plus self_attn.q_norm / k_norm: one RMSNorm over head_dim applied to every
# head's query and key before RoPE, as Megatron's q_layernorm / k_layernorm. attention_bias switches the
# q/k/v/o biases together; the MLP has none. Sliding windows are per layer (layer_types).
strip_prefixes = llama.strip_prefixes
weights_from_hf = llama.weights_from_hf
weights_to_hf = llama.weights_to_hf
SLIDING, FULL = "sliding_attention", "full_attention"


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a Qwen3ForCausalLM cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    llama.check_llama_layout(cfg, target, transformers.Qwen3Config)
    if cfg.add_bias_linear:
        fail(
            f"{target} (the HF model for --qk-layernorm): the model has MLP biases (no --disable-bias-linear), "
            "but Qwen3's MLP has none"
        )


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers Qwen3Config of this model."""
    config_class = transformers.Qwen3Config
    values = llama.base_config_values(cfg, config_class, HF_ARCHITECTURE, dtype, eos, extra)
    window = sliding_window(cfg)
    values.update(
        attention_bias=cfg.qkv_bias,
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=0,
        layer_types=[SLIDING if window is not None else FULL] * cfg.num_layers,
    )
    return make_hf_config(config_class, **values)


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a Qwen3Config; UserError for what megatron-lite cannot compute."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    values = llama.base_config_from_hf(hf, target)
    values.update(llama.bias_fields(bool(getattr(hf, "attention_bias", False)), False), qk_layernorm=True)
    kinds = set(getattr(hf, "layer_types", None) or [FULL])
    if kinds == {SLIDING}:
        values["window_size"] = window_size_from_hf(hf.sliding_window, target)
    elif kinds != {FULL}:
        fail(
            f"{target}: layer_types mixes sliding and full attention layers; megatron-lite's --window-size "
            "applies to every layer"
        )
    return values
