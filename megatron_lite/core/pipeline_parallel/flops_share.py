"""The share of the model's training FLOPs that one pipeline rank computes (its layers, and the logits on the last)."""

from __future__ import annotations

from megatron_lite.core.pipeline_parallel.layers import PipelineSplit


def stage_flops_share(cfg: object, whole_flops: float, batch_size: int, pp_rank: int) -> float:
    """Of `whole_flops` (num_floating_point_operations over batch_size samples), the fraction pipeline rank
    pp_rank computes: its layers' share of the transformer FLOPs, plus the output layer's on the last rank
    (Megatron's count: the logits term is 6 * B * s * h * V)."""
    split = PipelineSplit.from_config(cfg)
    if split.pipeline_size == 1 or whole_flops <= 0:
        return 1.0
    logits = 6.0 * batch_size * cfg.seq_length * cfg.hidden_size * cfg.padded_vocab_size
    layers = whole_flops - logits
    mine = sum(len(split.layer_range(pp_rank, v)) for v in range(split.chunks_per_rank))
    share = layers * mine / cfg.num_layers + (logits if pp_rank == split.pipeline_size - 1 else 0.0)
    return share / whole_flops
