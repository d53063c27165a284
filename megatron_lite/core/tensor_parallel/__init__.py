"""Tensor-parallel core: collectives as autograd functions, sharded layers, vocab-parallel loss, RNG streams."""

from megatron_lite.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_lite.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_lite.core.tensor_parallel.random import (
    DATA_PARALLEL_RNG,
    MODEL_PARALLEL_RNG,
    Dropout,
    RNGStatesTracker,
    checkpoint_with_rng_tracker,
    get_cuda_rng_tracker,
    get_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
    seed_model_parallel_rng,
)
from megatron_lite.core.tensor_parallel.utils import (
    init_method_normal,
    init_sharded_weight,
    merge_shards,
    scaled_init_method_normal,
    set_tensor_model_parallel_attributes,
    split_for_rank,
)

__all__ = [
    "ColumnParallelLinear",
    "DATA_PARALLEL_RNG",
    "Dropout",
    "MODEL_PARALLEL_RNG",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "checkpoint_with_rng_tracker",
    "copy_to_tensor_model_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "get_cuda_rng_tracker",
    "get_rng_tracker",
    "init_method_normal",
    "init_sharded_weight",
    "merge_shards",
    "model_parallel_cuda_manual_seed",
    "model_parallel_manual_seed",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scaled_init_method_normal",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "seed_model_parallel_rng",
    "set_tensor_model_parallel_attributes",
    "split_for_rank",
    "vocab_parallel_cross_entropy",
]
