"""Helpers shared by the TP layers: init methods, parameter attributes, and full <-> shard conversion."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

InitMethod = Callable[[torch.Tensor], object]


def init_method_normal(std: float) -> InitMethod:
    """In-place N(0, std) init."""

    def init_(tensor: torch.Tensor) -> object:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, std / sqrt(2 * num_layers)): output projections, so the residual stream's variance stays put."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def set_tensor_model_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, partition_dim: int = -1, stride: int = 1
) -> None:
    """Mark a parameter as TP-sharded along partition_dim (or replicated), as Megatron does.

    `partition_stride` > 1 means the full tensor is split into stride x tp chunks along partition_dim
    and rank r holds chunks r, r + tp, ... (SwiGLU's fc1: [gate_r; up_r]); see split_for_rank.
    """
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = stride


def split_for_rank(full: torch.Tensor, dim: int, rank: int, world_size: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of a full tensor (a contiguous copy)."""
    if full.shape[dim] % (world_size * stride) != 0:
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} does not split into {world_size} x {stride} chunks"
        )
    chunks = full.chunk(world_size * stride, dim=dim)
    return torch.cat(chunks[rank::world_size], dim=dim).contiguous()


def merge_shards(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of split_for_rank: the full tensor from every rank's shard, in rank order."""
    per_rank = [shard.chunk(stride, dim=dim) for shard in shards]
    ordered = [per_rank[rank][k] for k in range(stride) for rank in range(len(shards))]
    return torch.cat(ordered, dim=dim)


def init_sharded_weight(
    full_shape: tuple[int, ...],
    init_method: InitMethod,
    partition_dim: int,
    rank: int,
    world_size: int,
    stride: int = 1,
    unpadded_rows: int | None = None,
) -> torch.Tensor:
    """Draw the FULL weight from the default generator, then keep this rank's shard.

    Every rank draws the same full tensor, so a seed gives the same model at any TP size. Rows from
    `unpadded_rows` on are vocabulary padding: zero, and drawn from no RNG, so the number of draws (and
    every later layer's weights) does not depend on how much TP padding there is. The full tensor lives
    only while this one layer is built.
    """
    full = torch.empty(full_shape, dtype=torch.float32)
    if unpadded_rows is None or unpadded_rows >= full_shape[0]:
        init_method(full)
    else:
        full.zero_()
        init_method(full[:unpadded_rows])
    if world_size == 1:
        return full
    return split_for_rank(full, partition_dim, rank, world_size, stride)
