"""Autograd-aware collectives that move activations in and out of the tensor/sequence-parallel region."""

from __future__ import annotations

import torch
import torch.distributed as dist

# Every function takes the TP process group explicitly (no global state); a group of None or of size 1
# means "no tensor parallelism" and every mapping returns its input unchanged, outside autograd, so
# single-process code pays nothing.
# Sequence-parallel tensors are [s, b, h] and sharded along dim 0; TP-sharded tensors along the last dim.


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


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        # When the consumer is TP-sharded (a column-parallel linear), each rank holds a partial gradient
        # of the full sequence and they must be summed; when it is replicated, each rank already has it.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce the gradient over the TP group."""
    if _size(group) == 1:
        return x
    return _CopyToModelParallelRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-reduce (sum) over the TP group; identity gradient."""
    if _size(group) == 1:
        return x
    return _ReduceFromModelParallelRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; all-gather the gradient."""
    if _size(group) == 1:
        return x
    return _ScatterToModelParallelRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather the last dim over the TP group (e.g. vocab-sharded logits); split the gradient."""
    if _size(group) == 1:
        return x
    return _GatherFromModelParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of dim 0 (the sequence); all-gather the gradient."""
    if _size(group) == 1:
        return x
    return _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather dim 0; reduce-scatter the gradient (or just split it when the consumer is replicated)."""
    if _size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Sum over the TP group and keep this rank's chunk of dim 0; all-gather the gradient."""
    if _size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
