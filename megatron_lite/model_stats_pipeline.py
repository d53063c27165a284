"""Sizing under pipeline parallelism: parameters and memory of each stage, in-flight activations, the bubble."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config import MegatronConfig
from megatron_lite.core.pipeline_parallel.layers import PipelineSplit
from megatron_lite.model_stats import MB, ModelStats


@dataclass(frozen=True)
class StageStats:
    """One pipeline rank (all its virtual stages), on one TP rank."""

    pp_rank: int
    layers: list[range]  # global layer numbers of each of its model chunks
    params_per_rank: int
    in_flight: int  # chunk forward passes whose activations are kept at the peak (Megatron's warmup + 1)
    activation_bytes: float
    total_bytes: float


def in_flight_microbatches(pp_rank: int, pp_size: int, num_microbatches: int, chunks: int = 1) -> int:
    """Chunk forwards whose activations a rank holds at its peak: 1F1B runs P - p - 1 warmup forwards
    and then one more before its first backward; interleaved (Megatron's schedule, micro batches in
    groups of P) warms up (P - p - 1) x 2 + (V - 1) x P. Never more than the step's m x V forwards."""
    if chunks == 1:
        warmup = pp_size - pp_rank - 1
    else:
        warmup = (pp_size - pp_rank - 1) * 2 + (chunks - 1) * pp_size
    return min(warmup + 1, num_microbatches * chunks)


def pipeline_bubble(pp_size: int, num_microbatches: int, chunks: int = 1) -> float:
    """The idle fraction of a step: (P - 1) / (m + P - 1) for 1F1B; interleaving shortens the fill and
    drain to (P - 1) / V chunk-steps: ((P - 1) / V) / (m + (P - 1) / V)."""
    fill = (pp_size - 1) / chunks
    return fill / (num_microbatches + fill)


def stage_stats(cfg: MegatronConfig, stats: ModelStats) -> list[StageStats]:
    """Per pipeline rank: its parameters (TP shard) and memory, as compute_stats counts them for the whole
    model, with the activations of its in-flight micro batches."""
    split = PipelineSplit.from_config(cfg)
    p = stats.params
    tp = cfg.tensor_model_parallel_size
    acts = stats.activations
    layer_bytes = acts.layers / max(1, cfg.num_layers)  # recompute spread evenly over the layers
    per_param = stats.total_bytes - acts.total  # weights, grads, optimizer, copies: bytes per parameter x N
    per_param = per_param / p.per_rank if p.per_rank else 0.0
    out = []
    for rank in range(split.pipeline_size):
        ranges = [split.layer_range(rank, v) for v in range(split.chunks_per_rank)]
        layers = sum(len(r) for r in ranges)
        params = layers * p.per_rank_per_layer
        first, last = rank == 0, rank == split.pipeline_size - 1
        if first:
            params += p.word_embeddings // tp + p.position_embeddings
        if last:
            # Tied embeddings: the last stage keeps its own copy of the word embeddings.
            params += p.final_norm + (p.output_layer or p.word_embeddings) // tp
        in_flight = in_flight_microbatches(
            rank, split.pipeline_size, cfg.num_microbatches, split.chunks_per_rank
        )
        per_forward = layer_bytes * layers / split.chunks_per_rank
        if first or last:
            per_forward += acts.embedding_and_output / (2 if split.pipeline_size > 1 else 1)
        activation = in_flight * per_forward
        out.append(StageStats(rank, ranges, params, in_flight, activation, params * per_param + activation))
    return out


def format_pipeline_report(cfg: MegatronConfig, stats: ModelStats) -> str:
    """The pipeline section of model_stats.py's report."""
    split = PipelineSplit.from_config(cfg)
    m, v = cfg.num_microbatches, split.chunks_per_rank
    schedule = f"interleaved 1F1B, {v} virtual stages per rank" if v > 1 else "1F1B"
    lines = [
        "",
        f"pipeline: {split.pipeline_size} stages, {schedule}, {m} micro batches per step; "
        f"bubble {pipeline_bubble(split.pipeline_size, m, v):.1%} of the step",
    ]
    for stage in stage_stats(cfg, stats):
        layers = ", ".join(f"{r.start}-{r.stop - 1}" if len(r) else "none" for r in stage.layers)
        lines.append(
            f"  stage {stage.pp_rank}: layers {layers}; {stage.params_per_rank:,} parameters per rank; "
            f"{stage.in_flight} forwards in flight, activations {stage.activation_bytes / MB:,.2f} MB; "
            f"total {stage.total_bytes / MB:,.2f} MB"
        )
    return "\n".join(lines)
