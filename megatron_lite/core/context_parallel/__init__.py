"""Context parallelism: each rank holds 2 of 2C chunks of every sequence; attention is exact across them."""

from megatron_lite.core.context_parallel.apply import apply_context_parallel
from megatron_lite.core.context_parallel.attention import CP_COMM_TYPES, context_parallel_attention
from megatron_lite.core.context_parallel.sequence_split import (
    check_sequence_split,
    cp_positions,
    split_batch_for_cp,
)

__all__ = [
    "apply_context_parallel",
    "CP_COMM_TYPES",
    "check_sequence_split",
    "context_parallel_attention",
    "cp_positions",
    "split_batch_for_cp",
]
