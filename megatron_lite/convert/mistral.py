"""Llama-layout models with sliding-window attention (--window-size) <-> HuggingFace MistralForCausalLM."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from megatron_lite.config import MegatronConfig
from megatron_lite.convert import llama
from megatron_lite.convert.common import make_hf_config, sliding_window, window_size_from_hf
from megatron_lite.errors import fail

HF_ARCHITECTURE = "MistralForCausalLM"
MODEL_TYPE = "mistral"

# Mistral is Llama's layout without any biases and with one sliding window on every layer: HF's
# sliding_window counts the keys a query sees including itself, Megatron's left window those before it.
strip_prefixes = llama.strip_prefixes
weights_from_hf = llama.weights_from_hf
weights_to_hf = llama.weights_to_hf


def check_exportable(cfg: MegatronConfig, transformers: ModuleType) -> None:
    """UserError naming the first option a MistralForCausalLM cannot express."""
    target = f"cannot export to {HF_ARCHITECTURE}"
    llama.check_llama_layout(cfg, target, transformers.MistralConfig)
    if cfg.qkv_bias or cfg.add_bias_linear:
        fail(
            f"{target} (the HF model for --window-size): the model has linear biases, but Mistral has none; "
            "train with --disable-bias-linear"
        )


def hf_config(
    cfg: MegatronConfig, transformers: ModuleType, *, dtype: str, eos: int | None, extra: dict[str, Any]
) -> Any:
    """The transformers MistralConfig of this model."""
    config_class = transformers.MistralConfig
    values = llama.base_config_values(cfg, config_class, HF_ARCHITECTURE, dtype, eos, extra)
    values["sliding_window"] = sliding_window(cfg)
    return make_hf_config(config_class, **values)


def config_from_hf(hf: Any) -> dict[str, Any]:
    """MegatronConfig model fields of a MistralConfig."""
    target = f"cannot import this {HF_ARCHITECTURE}"
    values = llama.base_config_from_hf(hf, target)
    values["window_size"] = window_size_from_hf(getattr(hf, "sliding_window", None), target)
    return values
