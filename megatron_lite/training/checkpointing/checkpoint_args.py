"""--use-checkpoint-args: the model's settings taken from the --load checkpoint's args, as Megatron-LM does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_lite.training.checkpointing.common import read_common
from megatron_lite.training.checkpointing.megatron_common import (
    config_of,
    is_megatron_layout,
)
from megatron_lite.training.checkpointing.names import read_latest_iteration, resolve_checkpoint

# Megatron-LM's load_args_from_checkpoint: these are set only where the command line left them unset...
_UNLESS_GIVEN = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads")
_UNLESS_GIVEN_LATE = ("kv_channels", "max_position_embeddings")
# ...and these always replace what it gave.
_FORCED = (
    "num_query_groups",
    "group_query_attention",
    "position_embedding_type",
    "add_position_embedding",
    "use_rotary_position_embeddings",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "add_bias_linear",
    "add_qkv_bias",
    "squared_relu",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "layernorm_zero_centered_gamma",
    "normalization",
    "apply_query_key_layer_scaling",
    "attention_dropout",
    "hidden_dropout",
    "num_experts",
    "moe_layer_freq",
    "moe_router_topk",
    "tokenizer_type",
    "tiktoken_pattern",
)
# What our own checkpoints also record about the model, taken with the forced ones.
_OURS_TOO = ("layernorm_epsilon", "qk_layernorm", "openai_gelu", "window_size", "vocab_size")


def apply_checkpoint_args(cfg: Any) -> list[str]:
    """Overwrite cfg's model settings with those of the latest checkpoint in cfg.load (before finalize);
    returns one line per setting changed. A model megatron-lite cannot build is refused naming the flag."""
    load_dir = Path(cfg.load)
    if read_latest_iteration(load_dir) is None:
        return []  # as Megatron: no checkpoint, the given arguments stand
    ckpt = resolve_checkpoint(load_dir, None)
    common = read_common(ckpt)
    if is_megatron_layout(common):
        saved = vars(config_of(common, ckpt))  # refuses, naming the flag, what we cannot build
    else:
        saved = dict(common["args"])
    changed = []

    def take(name: str, *, force: bool) -> None:
        value = saved.get(name)
        if value is None or not hasattr(cfg, name):
            return
        if not force and getattr(cfg, name) is not None:
            return
        if getattr(cfg, name) != value:
            changed.append(f"Setting {name} to {value} from checkpoint")
            setattr(cfg, name, value)

    for name in _UNLESS_GIVEN + _UNLESS_GIVEN_LATE:
        take(name, force=False)
    for name in _FORCED + _OURS_TOO:
        take(name, force=True)
    if cfg.use_mp_args_from_checkpoint_args:
        take("tensor_model_parallel_size", force=True)
    return changed
