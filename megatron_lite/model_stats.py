"""Sizing a model before running it: exact parameter counts, memory per rank and FLOPs, from the flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_lite.arguments import build_parser, config_from_namespace
from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail
from megatron_lite.model_stats_memory import (  # noqa: F401  (re-exported: model_stats' public API)
    ActivationEstimate,
    _local_seq,
    activation_bytes_per_layer,
    attention_keeps_probabilities,
    estimate_activations,
)
from megatron_lite.training.flops import flops_per_token, num_floating_point_operations

MB = 2**20


# ---- configuration --------------------------------------------------------------------------------
def build_sizing_parser() -> argparse.ArgumentParser:
    """pretrain_gpt.py's flags plus the layout flags that only sizing needs."""
    parser = build_parser()
    parser.prog = "model_stats.py"
    parser.description = (
        "Parameters, memory per rank and FLOPs of a GPT model, from the same flags as pretrain_gpt.py. "
        "Training and data flags may be left out."
    )
    group = parser.add_argument_group("sizing")
    group.add_argument(
        "--world-size", dest="sizing_world_size", type=int, metavar="N", help="Number of processes."
    )
    group.add_argument(
        "--data-parallel-size",
        dest="sizing_data_parallel_size",
        type=int,
        metavar="N",
        help="Data-parallel size (world size = this x --tensor-model-parallel-size).",
    )
    group.add_argument(
        "--unfused-attention",
        dest="sizing_unfused_attention",
        action="store_true",
        help="Size activations for an attention that keeps the s x s probabilities (no SDPA/flash).",
    )
    group.add_argument(
        "--estimate",
        dest="sizing_estimate",
        metavar="DEVICE",
        help="Also predict the iteration time, TFLOP/s per GPU, MFU and tokens/s on DEVICE: "
        "A100-40GB, A100-80GB, H100, H200, or cpu (measures this machine at the model's shapes).",
    )
    return parser


def build_sizing_config(argv: list[str] | None = None) -> tuple[MegatronConfig, bool]:
    """A finalized config for sizing from model flags alone, and whether --unfused-attention was given.

    Training-only requirements (--lr, --train-iters, data) get placeholders here: they do not change
    any size, and asking for them would make the tool useless before a run is planned.
    """
    namespace = vars(build_sizing_parser().parse_args(argv))
    world = namespace.pop("sizing_world_size", None)
    dp = namespace.pop("sizing_data_parallel_size", None)
    unfused = namespace.pop("sizing_unfused_attention", False)
    namespace.pop("sizing_estimate", None)  # read by model_stats_main
    cfg = config_from_namespace(namespace)

    # A model replica spans TP x PP ranks.
    tp = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    if dp is not None and dp < 1:
        fail(f"--data-parallel-size must be >= 1, got {dp}")
    if world is not None and world < 1:
        fail(f"--world-size must be >= 1, got {world}")
    if world is not None and dp is not None and world != dp * tp:
        fail(
            f"--world-size {world} does not equal --data-parallel-size {dp} x "
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size {tp}; give one of the two"
        )
    world_size = world if world is not None else (dp or 1) * tp

    if cfg.micro_batch_size is None:
        cfg.micro_batch_size = 1
    if cfg.train_iters is None and cfg.train_samples is None:
        cfg.train_iters = 1
    if cfg.lr is None:
        cfg.lr = max(cfg.min_lr, 1e-4)
    if cfg.data_path is None and not any((cfg.train_data_path, cfg.valid_data_path, cfg.test_data_path)):
        cfg.mock_data = True
    if cfg.save is not None and cfg.save_interval is None:
        cfg.save_interval = 1
    vocab_size = None
    if cfg.vocab_size is None:
        from megatron_lite.tokenizer import build_tokenizer

        if cfg.tokenizer_type is None and cfg.vocab_file is None and cfg.merge_file is None:
            vocab_size = build_tokenizer("GPT2BPETokenizer").vocab_size
        else:
            vocab_size = build_tokenizer(cfg).vocab_size  # --tokenizer-model etc. as training reads them
    return cfg.finalize(world_size=world_size, vocab_size=vocab_size), unfused


# ---- parameters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts: the whole model, and what one tensor-parallel rank holds."""

    word_embeddings: int
    position_embeddings: int
    per_layer: int
    layers: int
    final_norm: int
    output_layer: int  # 0 when tied to the word embeddings
    total: int
    per_rank: int
    per_rank_per_layer: int


def count_parameters(cfg: MegatronConfig) -> ParameterCounts:
    """Parameters of GPTModel for a finalized cfg, counted from the shapes Megatron uses.

    Word embeddings (and an untied output layer) have padded_vocab_size rows sharded over TP; QKV
    and fc1 are column-parallel (weight and bias sharded), proj and fc2 row-parallel (weight sharded,
    bias replicated); norms and position embeddings are replicated. LayerNorm has weight and bias,
    RMSNorm a weight only. SwiGLU doubles fc1's outputs. The output layer has no bias.
    """
    tp = cfg.tensor_model_parallel_size
    h, kv = cfg.hidden_size, cfg.kv_channels
    a, g, ffn = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    norm = h * (2 if cfg.normalization == "LayerNorm" else 1)
    bias = cfg.add_bias_linear

    qkv_out = (a + 2 * g) * kv
    fc1_out = ffn * (2 if cfg.swiglu else 1)
    if cfg.multi_latent_attention:
        sharded, replicated = _mla_parameters(cfg)
    else:
        sharded = qkv_out * h + (qkv_out if cfg.qkv_bias else 0)  # linear_qkv
        sharded += h * a * kv  # linear_proj weight
        replicated = 0
    sharded += fc1_out * h + (fc1_out if bias else 0)  # linear_fc1
    sharded += h * ffn  # linear_fc2 weight
    replicated += 2 * norm + (2 * h if bias else 0)  # two norms; proj and fc2 biases
    per_layer = sharded + replicated
    per_rank_per_layer = sharded // tp + replicated

    vocab = cfg.padded_vocab_size
    words = vocab * h
    positions = cfg.max_position_embeddings * h if cfg.position_embedding_type == "learned_absolute" else 0
    output = 0 if not cfg.untie_embeddings_and_output_weights else vocab * h
    layers = cfg.num_layers
    total = words + positions + layers * per_layer + norm + output
    per_rank = (words + output) // tp + positions + layers * per_rank_per_layer + norm
    return ParameterCounts(
        word_embeddings=words,
        position_embeddings=positions,
        per_layer=per_layer,
        layers=layers,
        final_norm=norm,
        output_layer=output,
        total=total,
        per_rank=per_rank,
        per_rank_per_layer=per_rank_per_layer,
    )


def _mla_parameters(cfg: MegatronConfig) -> tuple[int, int]:
    """Multi-latent attention's weights (its proj bias is counted with the layer's): those sharded over TP
    (the query and up projections, linear_proj) and those every rank holds (the down projections, the
    latent norms of --qk-layernorm)."""
    h, a = cfg.hidden_size, cfg.num_attention_heads
    q_head = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
    per_norm = 2 if cfg.normalization == "LayerNorm" else 1
    sharded = cfg.kv_lora_rank * a * (cfg.qk_head_dim + cfg.v_head_dim) + a * cfg.v_head_dim * h
    replicated = h * (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim)
    latent_norms = cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
        sharded += h * a * q_head
    else:
        sharded += cfg.q_lora_rank * a * q_head
        replicated += h * cfg.q_lora_rank
        latent_norms += cfg.q_lora_rank
    if cfg.qk_layernorm:
        replicated += per_norm * latent_norms
    return sharded, replicated


# ---- everything together --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelStats:
    """Parameters, memory per rank (bytes) and FLOPs of one configuration."""

    params: ParameterCounts
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    autocast_copies_bytes: float
    activations: ActivationEstimate
    total_bytes: float
    flops_per_token: float
    flops_per_iteration: float


def compute_stats(cfg: MegatronConfig, *, unfused_attention: bool = False) -> ModelStats:
    """All sizing figures for a finalized cfg.

    Parameters and gradients are fp32 on every rank (bf16/fp16 run through autocast, and gradients
    accumulate in fp32). AdamW keeps two fp32 states per parameter, divided over DP ranks with
    --use-distributed-optimizer. Under autocast the 16-bit copies of the weights live through each
    forward/backward (counted for all parameters: a slight overestimate, norms stay fp32).
    """
    params = count_parameters(cfg)
    weights = 4.0 * params.per_rank
    grads = 4.0 * params.per_rank
    optimizer = 8.0 * params.per_rank
    if cfg.use_distributed_optimizer:
        optimizer = 8.0 * -(-params.per_rank // (cfg.data_parallel_size * cfg.context_parallel_size))
    copies = 2.0 * params.per_rank if (cfg.bf16 or cfg.fp16) else 0.0
    acts = estimate_activations(cfg, cfg.micro_batch_size, unfused_attention=unfused_attention)
    return ModelStats(
        params=params,
        weights_bytes=weights,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        autocast_copies_bytes=copies,
        activations=acts,
        total_bytes=weights + grads + optimizer + copies + acts.total,
        flops_per_token=flops_per_token(cfg),
        flops_per_iteration=num_floating_point_operations(cfg, cfg.global_batch_size),
    )


def format_report(cfg: MegatronConfig, stats: ModelStats) -> str:
    """The human-readable report model_stats.py prints."""
    p = stats.params
    tp, dp = cfg.tensor_model_parallel_size, cfg.data_parallel_size
    precision = "bf16 autocast" if cfg.bf16 else "fp16 autocast" if cfg.fp16 else "fp32"
    attention = "GQA" if cfg.num_query_groups != cfg.num_attention_heads else "MHA"
    recompute = cfg.recompute_granularity or "none"
    if recompute == "full":
        recompute += f" ({cfg.recompute_method}, {cfg.recompute_num_layers} layers)"
    lines = [
        f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
        f"({attention}, {cfg.num_query_groups} query groups, head dim {cfg.kv_channels}), "
        f"ffn {cfg.ffn_hidden_size}{' SwiGLU' if cfg.swiglu else ''}, {cfg.normalization}, "
        f"positions {cfg.position_embedding_type}, seq {cfg.seq_length}, "
        f"vocab {cfg.vocab_size} padded to {cfg.padded_vocab_size}, "
        f"{'untied' if cfg.untie_embeddings_and_output_weights else 'tied'} embeddings",
        f"layout: {cfg.world_size} rank{'s' if cfg.world_size > 1 else ''} = TP {tp} x DP {dp}"
        f"{f' x PP {cfg.pipeline_model_parallel_size}' if cfg.pipeline_model_parallel_size > 1 else ''}"
        f"{f' x CP {cfg.context_parallel_size}' if cfg.context_parallel_size > 1 else ''}; micro batch {cfg.micro_batch_size}, "
        f"global batch {cfg.global_batch_size}; {precision}; sequence parallel "
        f"{'on' if cfg.sequence_parallel else 'off'}; distributed optimizer "
        f"{'on' if cfg.use_distributed_optimizer else 'off'}; recompute {recompute}",
        "",
        "parameters",
        _row("total", f"{p.total:,}", f"{p.total / 1e6:,.2f} M"),
        _row("per rank (TP shard)", f"{p.per_rank:,}", f"{p.per_rank / 1e6:,.2f} M"),
        _row("  word embeddings", f"{p.word_embeddings:,}", "sharded over TP"),
        _row("  position embeddings", f"{p.position_embeddings:,}", "replicated"),
        _row("  per layer", f"{p.per_layer:,}", f"{p.per_rank_per_layer:,} per rank"),
        _row(f"  layers ({p.layers})", f"{p.layers * p.per_layer:,}", ""),
        _row("  final norm", f"{p.final_norm:,}", "replicated"),
        _row("  output layer", f"{p.output_layer:,}", "tied" if not p.output_layer else "sharded over TP"),
        *_moe_rows(cfg, p.total),
        "",
        "memory per rank (MB = 2**20 bytes)",
        _row("weights (fp32)", _mb(stats.weights_bytes), ""),
        _row("gradients (fp32)", _mb(stats.grads_bytes), ""),
        _row(
            "optimizer (AdamW, 2 fp32 states)",
            _mb(stats.optimizer_bytes),
            f"sharded over DP {dp}{f' x CP {cfg.context_parallel_size}' if cfg.context_parallel_size > 1 else ''}"
            if cfg.use_distributed_optimizer
            else "",
        ),
    ]
    if stats.autocast_copies_bytes:
        lines.append(_row("16-bit weight copies (autocast)", _mb(stats.autocast_copies_bytes), ""))
    acts = stats.activations
    kind = "s x s probabilities kept" if acts.attention_probabilities_kept else "SDPA path, no s x s term"
    lines += [
        _row(f"activations (micro batch {cfg.micro_batch_size})", _mb(acts.total), kind),
        *(
            [_row("  context parallel", f"{_local_seq(cfg)} of {cfg.seq_length} positions per rank", "")]
            if cfg.context_parallel_size > 1
            else []
        ),
        _row("  per layer, no recompute", _mb(acts.per_layer), ""),
        _row("  all layers", _mb(acts.layers), f"recompute {recompute}"),
        _row("  embedding, final norm, loss", _mb(acts.embedding_and_output), ""),
        _row("total", _mb(stats.total_bytes), f"{stats.total_bytes / 2**30:,.2f} GiB"),
        "",
        "FLOPs (forward + backward, Megatron's formula)",
        _row("per token", f"{stats.flops_per_token:.4e}", f"{stats.flops_per_token / 1e9:,.3f} GFLOP"),
        _row(
            f"per iteration ({cfg.global_batch_size} x {cfg.seq_length} tokens)",
            f"{stats.flops_per_iteration:.4e}",
            f"{stats.flops_per_iteration / 1e12 / cfg.world_size:,.3f} TFLOP per rank",
        ),
    ]
    return "\n".join(lines)


def _moe_rows(cfg: MegatronConfig, dense_total: int) -> list[str]:
    """With --num-experts: the MoE model's total and active (per token) parameters; the rows above
    count every layer as dense (memory figures too)."""
    if cfg.num_experts is None:
        return []
    from megatron_lite.core.transformer.moe.stats import moe_parameter_counts

    moe = moe_parameter_counts(cfg, dense_total)
    return [
        _row(
            "MoE: total parameters",
            f"{moe.total:,}",
            f"{moe.total / 1e6:,.2f} M (the rows above: dense MLPs)",
        ),
        _row(
            "MoE: active per token",
            f"{moe.active:,}",
            f"top-{cfg.moe_router_topk} of {cfg.num_experts} experts",
        ),
    ]


def _row(label: str, value: str, note: str) -> str:
    return f"  {label:<40} {value:>18}  {note}".rstrip()


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / MB:,.2f} MB"


def model_stats_main(argv: list[str] | None = None) -> int:
    """Entry point of tools/model_stats.py."""
    cfg, unfused = build_sizing_config(argv)
    stats = compute_stats(cfg, unfused_attention=unfused)
    report = format_report(cfg, stats)
    if cfg.pipeline_model_parallel_size > 1:
        from megatron_lite.model_stats_pipeline import format_pipeline_report

        report += "\n" + format_pipeline_report(cfg, stats)
    device_name = vars(build_sizing_parser().parse_known_args(argv)[0]).get("sizing_estimate")
    if device_name is not None:
        from megatron_lite.step_time_model import estimate_report

        report += "\n" + estimate_report(cfg, device_name, unfused_attention=unfused)
    print(report, flush=True)
    return 0
