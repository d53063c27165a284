"""Autograd-aware collectives that move activations in and out of the tensor/sequence-parallel region."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# Every function takes the TP process group explicitly (no global state); a group of None or of size 1
# means "no tensor parallelism" and every mapping returns its input unchanged, outside autograd, so
# single-process code pays nothing.
# Sequence-parallel tensors are [s, b, h] and sharded along dim 0; TP-sharded tensors along the last dim.

_Collective = Callable[[torch.Tensor, dist.ProcessGroup | None], torch.Tensor]


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _size(group) == 1:
        return x
    # Reduce into a copy: the input may be saved by another autograd node.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    if x.shape[-1] % size != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the TP size {size}")
    return x.chunk(size, dim=-1)[_rank(group)].contiguous()


def _gather_first(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, x, group=group)
    return out


def _gather_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    # Gather along dim 0 (one contiguous collective), then lay the rank chunks side by side.
    stacked = _gather_first(x.unsqueeze(0), group)  # [tp, *x.shape]
    return torch.cat(stacked.unbind(0), dim=-1)


def _split_first(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(f"sequence dimension {x.shape[0]} is not divisible by the TP size {size}")
    return x.chunk(size, dim=0)[_rank(group)].contiguous()


def _reduce_scatter_first(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(f"sequence dimension {x.shape[0]} is not divisible by the TP size {size}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, x, group=group)
    return out


def _identity(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x


def _mapping(name: str, forward_op: _Collective, backward_op: _Collective) -> type[torch.autograd.Function]:
    """An autograd Function that runs forward_op on the input and backward_op, its adjoint, on the gradient."""

    def forward(ctx, x, group):
        ctx.group = group
        return forward_op(x, group)

    def backward(ctx, grad):
        return backward_op(grad, ctx.group), None

    # type() rather than a class statement: each mapping keeps its own name in autograd graphs
    # (grad_fn=<_CopyToModelParallelRegionBackward>), as Megatron's hand-written classes do.
    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


# Megatron's mappings, each a (forward, backward) pair of collectives; the backward is the forward's adjoint.
_CopyToModelParallelRegion = _mapping("_CopyToModelParallelRegion", _identity, _all_reduce)
_ReduceFromModelParallelRegion = _mapping("_ReduceFromModelParallelRegion", _all_reduce, _identity)
_ScatterToModelParallelRegion = _mapping("_ScatterToModelParallelRegion", _split_last, _gather_last)
_GatherFromModelParallelRegion = _mapping("_GatherFromModelParallelRegion", _gather_last, _split_last)
_ScatterToSequenceParallelRegion = _mapping("_ScatterToSequenceParallelRegion", _split_first, _gather_first)
# When the consumer of a sequence gather is TP-sharded (a column-parallel linear), each rank holds a partial
# gradient of the full sequence and they must be summed (reduce-scatter); when it is replicated, each rank
# already has the full gradient and keeps its own slice.
_GatherFromSequenceParallelRegion = _mapping(
    "_GatherFromSequenceParallelRegion", _gather_first, _reduce_scatter_first
)
_GatherFromSequenceParallelRegionToReplicated = _mapping(
    "_GatherFromSequenceParallelRegionToReplicated", _gather_first, _split_first
)
_ReduceScatterToSequenceParallelRegion = _mapping(
    "_ReduceScatterToSequenceParallelRegion", _reduce_scatter_first, _gather_first
)


def _apply(
    function: type[torch.autograd.Function], x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    # Without tensor parallelism the mapping is the identity: skip autograd entirely.
    if _size(group) == 1:
        return x
    return function.apply(x, group)


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce the gradient over the TP group."""
    return _apply(_CopyToModelParallelRegion, x, group)


def reduce_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-reduce (sum) over the TP group; identity gradient."""
    return _apply(_ReduceFromModelParallelRegion, x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; all-gather the gradient."""
    return _apply(_ScatterToModelParallelRegion, x, group)


def gather_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather the last dim over the TP group (e.g. vocab-sharded logits); split the gradient."""
    return _apply(_GatherFromModelParallelRegion, x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of dim 0 (the sequence); all-gather the gradient."""
    return _apply(_ScatterToSequenceParallelRegion, x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather dim 0; reduce-scatter the gradient (or just split it when the consumer is replicated)."""
    if tensor_parallel_output_grad:
        return _apply(_GatherFromSequenceParallelRegion, x, group)
    return _apply(_GatherFromSequenceParallelRegionToReplicated, x, group)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Sum over the TP group and keep this rank's chunk of dim 0; all-gather the gradient."""
    return _apply(_ReduceScatterToSequenceParallelRegion, x, group)
