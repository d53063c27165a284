"""RoPE between megatron-lite and HF Llama-style configs: theta, llama3 / linear scaling, interleaved pairs."""

from __future__ import annotations

from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.convert.common import config_accepts
from megatron_lite.core.models.gpt.rope import (
    LLAMA3_HIGH_FREQ_FACTOR,
    LLAMA3_LOW_FREQ_FACTOR,
    LLAMA3_ORIGINAL_MAX_POSITIONS,
)
from megatron_lite.errors import fail

# Megatron's --use-rope-scaling is HF's rope_type "llama3" with Megatron's fixed constants, and
# --rotary-seq-len-interpolation-factor k is rope_type "linear" with factor k (HF divides the inverse
# frequencies by k, Megatron the positions: the same angles).
LLAMA3_CONSTANTS = {
    "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
    "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
    "original_max_position_embeddings": LLAMA3_ORIGINAL_MAX_POSITIONS,
}


def check_rope_exportable(cfg: MegatronConfig, target: str) -> None:
    """UserError for RoPE settings no HF rope_type expresses."""
    if cfg.rotary_percent != 1.0:
        fail(
            f"{target}: --rotary-percent {cfg.rotary_percent} rotates part of each head, but Llama "
            "rotates all of it (--rotary-percent 1.0)"
        )
    if cfg.use_rope_scaling and cfg.rotary_seq_len_interpolation_factor is not None:
        fail(
            f"{target}: --use-rope-scaling with --rotary-seq-len-interpolation-factor is two RoPE scalings; "
            "HuggingFace's rope_parameters holds one rope_type"
        )


def rope_parameters(cfg: MegatronConfig) -> dict[str, Any]:
    """HF's rope_parameters dict (transformers 5) of cfg's RoPE."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.use_rope_scaling:
        params.update(rope_type="llama3", factor=float(cfg.rope_scaling_factor), **LLAMA3_CONSTANTS)
    elif cfg.rotary_seq_len_interpolation_factor is not None:
        params.update(rope_type="linear", factor=float(cfg.rotary_seq_len_interpolation_factor))
    return params


def rope_config_values(cfg: MegatronConfig, config_class: type) -> dict[str, Any]:
    """The config keys of cfg's RoPE as this transformers version spells them."""
    params = rope_parameters(cfg)
    if config_accepts(config_class, "rope_parameters"):
        return {"rope_parameters": params}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {
        "rope_theta": params["rope_theta"],
        "rope_scaling": None if params["rope_type"] == "default" else scaling,
    }


def rope_from_hf(hf: Any, target: str) -> dict[str, Any]:
    """MegatronConfig RoPE fields of an HF config; UserError for what megatron-lite's RoPE cannot compute."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        fail(f"{target}: partial_rotary_factor {partial} is not supported; megatron-lite rotates whole heads")
    if theta != int(theta):
        fail(f"{target}: rope_theta {theta} is not a whole number, which --rotary-base must be")
    values: dict[str, Any] = {"rotary_base": int(theta), "rotary_percent": 1.0}
    if rope_type == "llama3":
        for key, expected in LLAMA3_CONSTANTS.items():
            if float(params.get(key, expected)) != float(expected):
                fail(
                    f"{target}: llama3 rope {key} {params.get(key)} differs from Megatron's {expected}, the "
                    "only value --use-rope-scaling computes"
                )
        values.update(use_rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif rope_type == "linear":
        factor = float(params["factor"])
        if factor != int(factor) or factor < 1:
            fail(
                f"{target}: linear rope factor {factor} is not a whole number >= 1, which "
                "--rotary-seq-len-interpolation-factor must be"
            )
        values["rotary_seq_len_interpolation_factor"] = int(factor)
    elif rope_type != "default":
        fail(
            f"{target}: rope scaling {rope_type!r} (rope_parameters/rope_scaling) is not supported; "
            "megatron-lite implements default, linear and llama3 RoPE"
        )
    return values


def rotate_half_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q or k (or a q/k norm's weight) [heads * head_dim, ...] from --rotary-interleaved order,
    where channels (2i, 2i+1) rotate together, into HF's rotate-half order, where (i, i + head_dim/2) do:
    within each head, the even channels first, then the odd ones. Scores q.k are sums over channels,
    so the same permutation of q and k leaves them unchanged (HF's own Meta-checkpoint converter
    applies the inverse)."""
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, head_dim, *rows.shape[1:])[:, order].reshape(rows.shape)
