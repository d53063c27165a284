"""Parallel layout settings: tensor, pipeline, sequence parallelism, recompute, backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail


@dataclass
class ParallelArgs:
    """Parallel layout settings: tensor, pipeline, sequence parallelism, recompute, backend."""

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size.", group="parallel")
    sequence_parallel: bool = _f(
        False, "Shard activations outside the TP region along the sequence.", group="parallel"
    )
    use_distributed_optimizer: bool = _f(
        False, "Shard optimizer state over data-parallel ranks.", group="parallel"
    )
    overlap_grad_reduce: bool = _f(
        False,
        "All-reduce gradient buckets during the last micro batch's backward (default: one all-reduce after it).",
        group="parallel",
    )
    overlap_param_gather: bool = _f(
        False,
        "With --use-distributed-optimizer: gather the updated parameters asynchronously, each waited for "
        "only when the next forward reaches it.",
        group="parallel",
    )
    recompute_activations: bool = _f(
        False, "Recompute the attention core in backward (selective).", group="parallel"
    )
    recompute_granularity: str | None = _f(
        None, "Activation recompute granularity.", choices=["full", "selective"], group="parallel"
    )
    recompute_method: str | None = _f(
        None, "How layers are chosen for full recompute.", choices=["uniform", "block"], group="parallel"
    )
    recompute_num_layers: int | None = _f(
        None, "Layers per recompute chunk (uniform) or recomputed (block).", group="parallel"
    )
    recompute_modules: list[str] | None = _f(
        None,
        "Submodules that --recompute-granularity selective reruns in backward: core_attn, mlp, layernorm "
        "(default: core_attn).",
        nargs="+",
        group="parallel",
    )
    distributed_backend: str | None = _f(
        None,
        "torch.distributed backend (default: nccl on GPU, gloo on CPU).",
        choices=["nccl", "gloo"],
        group="parallel",
    )
    distributed_timeout_minutes: float = _f(10.0, "Timeout of collectives, in minutes.", group="parallel")


# Megatron's --recompute-modules choices: the ones megatron-lite's GPT has, and what the others belong to.
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
_RECOMPUTE_MODULES_ELSEWHERE = {
    "moe_act": "mixture-of-experts layers",
    "moe": "mixture-of-experts layers",
    "shared_experts": "mixture-of-experts layers",
    "mla_up_proj": "multi-latent attention",
    "gdn_norm_out": "GatedDeltaNet layers",
    "gdp_in_proj": "GatedDeltaProduct layers",
    "gdp_qkv": "GatedDeltaProduct layers",
    "mhc": "hyper-connections",
}


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by * tp_size."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def derive_parallel(cfg: Any) -> None:
    tp = cfg.tensor_model_parallel_size
    if tp < 1:
        fail(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if cfg.world_size % tp != 0:
        fail(f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size {tp}")
    cfg.data_parallel_size = cfg.world_size // tp
    if cfg.overlap_param_gather and not cfg.use_distributed_optimizer:
        fail("--overlap-param-gather needs --use-distributed-optimizer")
    if cfg.overlap_param_gather and not cfg.overlap_grad_reduce:
        fail("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron)")
    if cfg.num_attention_heads % tp != 0:
        fail(
            f"--num-attention-heads {cfg.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if cfg.num_query_groups % tp != 0:
        fail(
            f"--num-query-groups {cfg.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if cfg.ffn_hidden_size % tp != 0:
        fail(f"--ffn-hidden-size {cfg.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if tp == 1:
        cfg.sequence_parallel = False
    if cfg.sequence_parallel and cfg.seq_length % tp != 0:
        fail(f"--sequence-parallel needs --seq-length {cfg.seq_length} divisible by TP size {tp}")
    if cfg.padded_vocab_size is not None:
        if cfg.padded_vocab_size % tp != 0 or (
            cfg.vocab_size is not None and cfg.padded_vocab_size < cfg.vocab_size
        ):
            fail(
                f"--padded-vocab-size {cfg.padded_vocab_size} must be at least the vocabulary size "
                f"{cfg.vocab_size} and divisible by --tensor-model-parallel-size {tp}"
            )
    elif cfg.vocab_size is not None:
        cfg.padded_vocab_size = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    if cfg.recompute_activations:
        cfg.recompute_granularity = "selective"
    _derive_recompute_modules(cfg)
    if cfg.recompute_granularity == "full":
        if cfg.recompute_method is None:
            fail("--recompute-granularity full needs --recompute-method uniform or block")
        if cfg.recompute_num_layers is None:
            cfg.recompute_num_layers = 1
        if not 1 <= cfg.recompute_num_layers <= cfg.num_layers:
            fail(f"--recompute-num-layers must be between 1 and --num-layers {cfg.num_layers}")


def _derive_recompute_modules(cfg: Any) -> None:
    """Megatron's TransformerConfig rules: the default is core_attn; names are checked for selective only."""
    if cfg.recompute_modules is None:
        cfg.recompute_modules = ["core_attn"]
    if cfg.recompute_granularity != "selective":
        return
    if cfg.recompute_method is not None:
        fail(
            f"--recompute-method {cfg.recompute_method} is for --recompute-granularity full; selective "
            "recompute picks its submodules with --recompute-modules"
        )
    for name in cfg.recompute_modules:
        if name in _RECOMPUTE_MODULES_ELSEWHERE:
            fail(
                f"--recompute-modules {name}: it recomputes part of {_RECOMPUTE_MODULES_ELSEWHERE[name]}, which "
                f"megatron-lite's GPT does not have (it has {', '.join(RECOMPUTE_MODULES)})"
            )
        if name not in RECOMPUTE_MODULES:
            fail(
                f"--recompute-modules {name} is not one of Megatron's submodules; megatron-lite recomputes "
                f"{', '.join(RECOMPUTE_MODULES)}"
            )
