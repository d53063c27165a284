"""Parallel layout settings: tensor, pipeline, sequence parallelism, recompute, backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name


@dataclass
class ParallelArgs:
    """Parallel layout settings: tensor, pipeline, sequence parallelism, recompute, backend."""

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size.", group="parallel")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size (stages).", group="parallel")
    num_layers_per_virtual_pipeline_stage: int | None = _f(
        None, "Layers per virtual pipeline stage (interleaved 1F1B).", group="parallel"
    )
    num_virtual_stages_per_pipeline_rank: int | None = _f(
        None, "Virtual pipeline stages (model chunks) per pipeline rank (interleaved 1F1B).", group="parallel"
    )
    decoder_first_pipeline_num_layers: int | None = _f(
        None, "Transformer layers on the first pipeline stage (default: an even split).", group="parallel"
    )
    decoder_last_pipeline_num_layers: int | None = _f(
        None, "Transformer layers on the last pipeline stage (default: an even split).", group="parallel"
    )
    account_for_embedding_in_pipeline_split: bool = _f(
        False, "Count the embedding as one layer when splitting layers over stages.", group="parallel"
    )
    account_for_loss_in_pipeline_split: bool = _f(
        False,
        "Count the loss (output layer) as one layer when splitting layers over stages.",
        group="parallel",
    )
    virtual_pipeline_model_parallel_size: int | None = _f(
        None, "Model chunks per pipeline rank (None: not interleaved).", derived=True
    )
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
    context_parallel_size: int = _f(
        1, "Context-parallel size: ranks that each hold 2 of 2C chunks of every sequence.", group="parallel"
    )
    cp_comm_type: list[str] = _f(
        ["p2p"],
        "How attention sees the other ranks' keys and values: p2p (a ring) or all_gather.",
        choices=["p2p", "all_gather"],
        nargs="+",
        group="parallel",
    )


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
    derive_pipeline(cfg)
    derive_context_parallel(cfg)
    cfg.data_parallel_size = cfg.world_size // (
        tp * cfg.pipeline_model_parallel_size * cfg.context_parallel_size
    )
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


def derive_pipeline(cfg: Any) -> None:
    """Megatron's pipeline checks: the world holds TP x PP, the layers split over the (virtual) stages."""
    from megatron_lite.core.pipeline_parallel.layers import PipelineSplit

    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if pp < 1:
        fail(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if cfg.world_size % (tp * pp) != 0:
        fail(
            f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    per_stage, stages = cfg.num_layers_per_virtual_pipeline_stage, cfg.num_virtual_stages_per_pipeline_rank
    if per_stage is not None and stages is not None:
        fail(
            "give only one of --num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank"
        )
    uneven = (
        cfg.decoder_first_pipeline_num_layers is not None or cfg.decoder_last_pipeline_num_layers is not None
    )
    for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        value = getattr(cfg, name)
        if value is not None and (pp == 1 or value < 0):
            fail(f"{flag_name(name)} {value} needs --pipeline-model-parallel-size > 1 and a count >= 0")
    cfg.virtual_pipeline_model_parallel_size = None
    if per_stage is not None:
        if uneven:
            fail(
                "--num-layers-per-virtual-pipeline-stage cannot be combined with an uneven split; give "
                "--num-virtual-stages-per-pipeline-rank"
            )
        slots = (
            cfg.num_layers
            + cfg.account_for_embedding_in_pipeline_split
            + cfg.account_for_loss_in_pipeline_split
        )
        if per_stage < 1 or slots % pp != 0 or (slots // pp) % per_stage != 0:
            fail(
                f"--num-layers-per-virtual-pipeline-stage {per_stage} does not divide the {slots / pp:g} layers "
                f"of each of the --pipeline-model-parallel-size {pp} stages"
            )
        cfg.virtual_pipeline_model_parallel_size = slots // pp // per_stage
    elif stages is not None:
        if stages < 1:
            fail(f"--num-virtual-stages-per-pipeline-rank must be >= 1, got {stages}")
        cfg.virtual_pipeline_model_parallel_size = stages
    if cfg.virtual_pipeline_model_parallel_size == 1 or pp == 1:
        cfg.virtual_pipeline_model_parallel_size = None
    if pp > 1:
        for name in ("overlap_grad_reduce", "overlap_param_gather", "compile"):
            if getattr(cfg, name):
                fail(
                    f"{flag_name(name)} with --pipeline-model-parallel-size {pp}: pipeline parallelism with "
                    "it is not implemented yet (issue 13)"
                )
    if pp > 1 or cfg.virtual_pipeline_model_parallel_size is not None:
        problem = PipelineSplit.from_config(cfg).problem()
        if problem is not None:
            fail(problem)
    if cfg.virtual_pipeline_model_parallel_size is not None:
        # Megatron's interleaved schedule takes micro batches in groups of PP (its default
        # --microbatch-group-size-per-virtual-stage); a remainder group would stall the pipeline.
        dp = cfg.world_size // (tp * pp)
        global_batch = cfg.global_batch_size or cfg.micro_batch_size * dp
        micro_batches = global_batch // (cfg.micro_batch_size * dp)
        if cfg.rampup_batch_size is None and micro_batches % pp != 0:
            fail(
                f"interleaved pipeline parallelism needs the micro batches per step ({micro_batches}) to be a "
                f"multiple of --pipeline-model-parallel-size {pp}"
            )


def derive_context_parallel(cfg: Any) -> None:
    """What context parallelism needs of the run, one line each (Megatron's checks and ours)."""
    cp = cfg.context_parallel_size
    if len(set(cfg.cp_comm_type)) > 1 or len(cfg.cp_comm_type) not in (1, cfg.num_layers):
        fail(
            f"--cp-comm-type {' '.join(cfg.cp_comm_type)}: give one type (per-layer types are not implemented)"
        )
    if cp == 1:
        return
    group = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cp
    if cfg.world_size % group != 0:
        fail(
            f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size "
            f"{cfg.tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{cfg.pipeline_model_parallel_size} x --context-parallel-size {cp}"
        )
    if cfg.seq_length % (2 * cp) != 0:
        fail(
            f"--seq-length {cfg.seq_length} is not divisible by 2 x --context-parallel-size {cp} = {2 * cp}: "
            "context parallelism splits each sequence into that many equal chunks"
        )
    if cfg.sequence_parallel and (cfg.seq_length // cp) % cfg.tensor_model_parallel_size != 0:
        fail(
            f"--sequence-parallel needs each context-parallel rank's {cfg.seq_length // cp} positions "
            f"divisible by TP size {cfg.tensor_model_parallel_size}"
        )
    unsupported = {
        "reset_attention_mask": cfg.reset_attention_mask,
        "num_experts": cfg.num_experts is not None,
        "softmax_type": getattr(cfg, "softmax_type", "vanilla") != "vanilla",
    }
    for name, given in unsupported.items():
        if given:
            fail(f"{flag_name(name)} with --context-parallel-size {cp} is not implemented yet (issue 15)")
