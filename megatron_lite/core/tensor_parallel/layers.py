"""Tensor-parallel building blocks: column/row-parallel linears and the vocab-parallel embedding."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.core.tensor_parallel.mappings import (
    _gather_first,
    _reduce_scatter_first,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_lite.core.tensor_parallel.utils import (
    InitMethod,
    init_sharded_weight,
    set_tensor_model_parallel_attributes,
)


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by the TP size {denominator}")
    return numerator // denominator


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's when it is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _SequenceParallelLinear(torch.autograd.Function):
    """out = all_gather_seq(x) @ W^T + b, keeping only the local [s/tp, b, in] input for backward.

    Saving the gathered input would hold the full sequence in every rank's memory and undo much of what
    sequence parallelism saves; backward gathers it again instead (Megatron does the same). The input
    gradient is reduce-scattered back to this rank's sequence shard. Autocast is applied by hand so the
    backward matmuls run in the forward's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        dtype = _compute_dtype(x)
        ctx.group = group
        ctx.has_bias = bias is not None
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)
        total = _gather_first(x, group)  # [s, b, in]
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(total, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        dtype = grad_out.dtype
        total = _gather_first(x.to(dtype), ctx.group)  # [s, b, in], gathered again
        grad_total = grad_out.matmul(weight.to(dtype))  # [s, b, in]
        grad_input = _reduce_scatter_first(grad_total, ctx.group)  # [s/tp, b, in]
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_2d.t().matmul(total.reshape(-1, total.shape[-1])).to(weight.dtype)
        grad_bias = grad_2d.sum(dim=0).to(weight.dtype) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None


class _ParallelLinear(nn.Module):
    """What both parallel linears hold: sizes, the TP group, sequence parallelism and an optional bias."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        skip_bias_add: bool,
        tp_group: dist.ProcessGroup | None,
        sequence_parallel: bool,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = _group_size_rank(tp_group)
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

    def _init_bias(self, bias: bool, size: int, is_parallel: bool, stride: int = 1) -> None:
        """A zero bias of `size` (this rank's part when is_parallel), or a None bias when bias is False."""
        if bias:
            self.bias = nn.Parameter(torch.zeros(size))
            set_tensor_model_parallel_attributes(self.bias, is_parallel, 0 if is_parallel else -1, stride)
        else:
            self.register_parameter("bias", None)


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by rows (output features) over the TP group: weight [out/tp, in].

    Input is replicated (copy_to_tp), or under sequence parallelism [s/tp, b, in] and all-gathered
    along the sequence here (its gradient reduce-scattered back). Output stays sharded on the last
    dim unless gather_output. forward returns (output, bias) with bias set only when skip_bias_add.
    With skip_weight_param_allocation the weight is passed to forward (the tied output layer).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        stride: int = 1,
        unpadded_output_size: int | None = None,
        skip_weight_param_allocation: bool = False,
    ) -> None:
        super().__init__(input_size, output_size, skip_bias_add, tp_group, sequence_parallel)
        self.output_size_per_partition = _divide(output_size, self.tp_size, "output size")
        self.gather_output = gather_output
        if self.sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear cannot gather its output under sequence parallelism")
        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            weight = init_sharded_weight(
                (output_size, input_size),
                init_method,
                0,
                self.tp_rank,
                self.tp_size,
                stride,
                unpadded_output_size,
            )
            self.weight = nn.Parameter(weight)
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
        self._init_bias(bias, self.output_size_per_partition, True, stride)

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if weight is None:
            if self.weight is None:
                raise ValueError("this ColumnParallelLinear has no weight of its own; pass weight=")
            weight = self.weight
        bias = None if self.skip_bias_add else self.bias
        if self.sequence_parallel:
            out = _SequenceParallelLinear.apply(
                x, weight, bias, self.tp_group
            )  # [s/tp, b, in] -> [s, b, out/tp]
        else:
            x = copy_to_tensor_model_parallel_region(x, self.tp_group)
            out = F.linear(x, weight, bias)  # [..., out/tp]
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}, "
            f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by columns (input features): weight [out, in/tp].

    The partial products are all-reduced, or reduce-scattered along the sequence under sequence
    parallelism; the replicated full bias is added after that reduction so it is counted once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__(input_size, output_size, skip_bias_add, tp_group, sequence_parallel)
        self.input_size_per_partition = _divide(input_size, self.tp_size, "input size")
        self.input_is_parallel = input_is_parallel
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear under sequence parallelism needs input_is_parallel=True")
        weight = init_sharded_weight((output_size, input_size), init_method, 1, self.tp_rank, self.tp_size)
        self.weight = nn.Parameter(weight)
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        # The full bias on every rank: it is added once, after the partial products are summed.
        self._init_bias(bias, output_size, False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)
        partial = F.linear(x, self.weight)  # [s, b, out], this rank's share of the sum
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)  # [s/tp, b, out]
        else:
            out = reduce_from_tensor_model_parallel_region(partial, self.tp_group)
        bias = self.bias
        if bias is not None and self.sequence_parallel:
            # Each rank adds the bias to its own sequence shard only, so its gradient is partial:
            # summing it over the TP group here gives every rank the full gradient.
            bias = copy_to_tensor_model_parallel_region(bias, self.tp_group)
        if self.skip_bias_add:
            return out, bias
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out, None

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, in_per_partition={self.input_size_per_partition}, out={self.output_size}, "
            f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over the TP group: weight [V/tp, h].

    Rank r owns token ids [r*V/tp, (r+1)*V/tp); other ids look up row 0 and are zeroed, and the sum over
    ranks gives the full embedding. Returns [b, s, h], or with reduce_scatter_embeddings [s/tp, b, h]
    (sequence parallelism: the sum and the sequence split happen in one reduce-scatter).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod,
        tp_group: dist.ProcessGroup | None = None,
        reduce_scatter_embeddings: bool = False,
        unpadded_num_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        tp_size, tp_rank = _group_size_rank(tp_group)
        self.tp_size = tp_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = _divide(num_embeddings, tp_size, "vocabulary size")
        self.vocab_start_index = tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.reduce_scatter_embeddings = reduce_scatter_embeddings and tp_size > 1
        weight = init_sharded_weight(
            (num_embeddings, embedding_dim),
            init_method,
            0,
            tp_rank,
            tp_size,
            unpadded_rows=unpadded_num_embeddings,
        )
        self.weight = nn.Parameter(weight)
        set_tensor_model_parallel_attributes(self.weight, True, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local_ids = input_ids
        out = F.embedding(local_ids, self.weight)  # [b, s, h]
        if self.tp_size > 1:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()  # [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)  # [s/tp, b, h]
        return reduce_from_tensor_model_parallel_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"rows=[{self.vocab_start_index}, {self.vocab_end_index})"
        )
