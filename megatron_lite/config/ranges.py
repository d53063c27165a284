"""The range of every numeric setting, checked once before anything is derived from it (issue 16).

Every numeric config field must have an entry here (a test enforces it), so a new field cannot arrive
without its range. Values that are None (unset) are not checked; lists are checked item by item.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from megatron_lite.config.fields import flag_name
from megatron_lite.errors import fail

# kind -> (test, wording after "must be")
_KINDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: v > 0, "positive"),
    "nonneg": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "probability": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "open_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "id_or_none": (lambda v: v >= -1, ">= -1 (-1: none)"),
    "any": (lambda v: True, "a number"),
    # Parsed and checked by their own group's code (a string form, a pattern, a pair).
    "parsed": (lambda v: True, ""),
}

RANGES: dict[str, str] = {
    # model
    "num_layers": "positive",
    "hidden_size": "positive",
    "num_attention_heads": "positive",
    "ffn_hidden_size": "positive",
    "kv_channels": "positive",
    "num_query_groups": "positive",
    "seq_length": "positive",
    "max_position_embeddings": "positive",
    "rotary_base": "positive",
    "rotary_percent": "open_fraction",
    "rotary_seq_len_interpolation_factor": "positive",
    "rope_scaling_factor": "positive",
    "window_size": "parsed",
    "layernorm_epsilon": "positive",
    "attention_dropout": "probability",
    "hidden_dropout": "probability",
    "init_method_std": "nonneg",
    "make_vocab_size_divisible_by": "positive",
    "vocab_size": "positive",
    "padded_vocab_size": "positive",
    "glu_linear_offset": "any",
    "activation_func_clamp_value": "positive",
    "window_attn_skip_freq": "parsed",
    # multi-latent attention
    "q_lora_rank": "positive",
    "kv_lora_rank": "positive",
    "qk_head_dim": "positive",
    "qk_pos_emb_head_dim": "positive",
    "v_head_dim": "positive",
    "rotary_scaling_factor": "positive",
    "mscale": "any",
    "mscale_all_dim": "any",
    # mixture of experts
    "num_experts": "positive",
    "moe_ffn_hidden_size": "positive",
    "moe_layer_freq": "parsed",
    "moe_router_topk": "positive",
    "moe_router_topk_scaling_factor": "positive",
    "moe_router_num_groups": "positive",
    "moe_router_group_topk": "positive",
    "moe_aux_loss_coeff": "nonneg",
    "moe_z_loss_coeff": "nonneg",
    "moe_router_bias_update_rate": "nonneg",
    "moe_expert_capacity_factor": "positive",
    "moe_shared_expert_intermediate_size": "positive",
    "expert_model_parallel_size": "positive",
    "expert_tensor_parallel_size": "positive",
    # batch and schedule
    "micro_batch_size": "positive",
    "global_batch_size": "positive",
    "rampup_batch_size": "parsed",  # microbatches checks it, naming each of its three numbers
    "train_iters": "nonneg",
    "train_samples": "nonneg",
    "lr": "nonneg",
    "min_lr": "nonneg",
    "lr_wsd_decay_iters": "nonneg",
    "lr_wsd_decay_samples": "nonneg",
    "lr_decay_iters": "nonneg",
    "lr_decay_samples": "nonneg",
    "lr_warmup_iters": "nonneg",
    "lr_warmup_samples": "nonneg",
    "lr_warmup_fraction": "fraction",
    "lr_warmup_init": "nonneg",
    "decoupled_lr": "nonneg",
    "decoupled_min_lr": "nonneg",
    # optimizer and loss scaling
    "sgd_momentum": "probability",
    "weight_decay": "nonneg",
    "start_weight_decay": "nonneg",
    "end_weight_decay": "nonneg",
    "clip_grad": "nonneg",
    "adam_beta1": "probability",
    "adam_beta2": "probability",
    "adam_eps": "positive",
    "loss_scale": "positive",
    "initial_loss_scale": "positive",
    "min_loss_scale": "positive",
    "loss_scale_window": "positive",
    "hysteresis": "positive",
    "max_consecutive_skipped_iterations": "positive",
    "seed": "seed",
    # parallelism and run
    "tensor_model_parallel_size": "positive",
    "pipeline_model_parallel_size": "positive",
    "context_parallel_size": "positive",
    "num_layers_per_virtual_pipeline_stage": "positive",
    "num_virtual_stages_per_pipeline_rank": "positive",
    "decoder_first_pipeline_num_layers": "nonneg",
    "decoder_last_pipeline_num_layers": "nonneg",
    "recompute_num_layers": "positive",
    "distributed_timeout_minutes": "positive",
    "num_workers": "nonneg",
    # tokenizer
    "tiktoken_num_special_tokens": "nonneg",
    "vocab_extra_ids": "nonneg",
    "null_tokenizer_eod_id": "nonneg",
    "null_tokenizer_pad_id": "id_or_none",
    # checkpointing, logging, profiling
    "save_interval": "positive",
    "save_keep_last": "positive",
    "save_retain_interval": "positive",
    "log_interval": "positive",
    "eval_interval": "positive",
    "eval_iters": "nonneg",
    "tensorboard_log_interval": "positive",
    "tensorboard_queue_size": "positive",
    "save_tokens_per_expert_interval": "positive",
    "timing_log_level": "nonneg",
    "peak_tflops": "positive",
    "exit_interval": "positive",
    "exit_duration_in_mins": "nonneg",
    "manual_gc_interval": "nonneg",
    "profile_step_start": "nonneg",
    "profile_step_end": "nonneg",
    "profile_ranks": "nonneg",
}


def numeric_fields(fields: list[Any]) -> list[str]:
    """The names of the fields whose type admits an int or a float (the ones RANGES must cover)."""
    out = []
    for f in fields:
        text = str(f.type)
        if ("int" in text or "float" in text) and "bool" != text:
            out.append(f.name)
    return out


def check_ranges(cfg: Any) -> None:
    """Every numeric setting in its range and finite: one line naming the flag, before any arithmetic."""
    for name, kind in RANGES.items():
        value = getattr(cfg, name, None)
        if value is None or kind == "parsed":
            continue
        test, wording = _KINDS[kind]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue  # a type the parser or YAML reader already refused, or a parsed form
            if isinstance(item, float) and not math.isfinite(item):
                fail(f"{flag_name(name)} must be a finite number, got {item}")
            if not test(item):
                fail(f"{flag_name(name)} must be {wording}, got {item}")
