"""Column/row-parallel linears and the vocab-parallel embedding on 2 gloo ranks vs plain full math."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
    merge_shards,
    split_for_rank,
)

S, B, IN, OUT = 4, 2, 8, 12
X = torch.randn(S, B, IN, generator=torch.Generator().manual_seed(0))
GRAD = torch.randn(S, B, OUT, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[0, 3, 5, 8], [9, 4, 1, 7]])  # [b, s] over a vocabulary of 9, padded to 10
EMB_GRAD = torch.randn(B, S, 6, generator=torch.Generator().manual_seed(2))


def _gather(t, dim, stride=1):
    shards = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, t.contiguous())
    return merge_shards(shards, dim, stride)


def _build(cls, *args, **kwargs):
    torch.manual_seed(42)  # the same default generator state for every build, as GPTModel does
    return cls(*args, init_method=init_method_normal(0.5), **kwargs)


def _column(group, rank, stride=1, gather_output=False, sequence_parallel=False):
    layer = _build(
        ColumnParallelLinear,
        IN,
        OUT,
        tp_group=group,
        stride=stride,
        gather_output=gather_output,
        sequence_parallel=sequence_parallel,
    )
    x = (split_for_rank(X, 0, rank, 2) if sequence_parallel else X).clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    grad = GRAD if gather_output else split_for_rank(GRAD, 2, rank, 2, stride)
    out.backward(grad)
    if not gather_output:
        out = _gather(out, 2, stride)
    x_grad = _gather(x.grad, 0) if sequence_parallel else x.grad
    return {
        "weight": _gather(layer.weight.data, 0, stride),
        "bias": _gather(layer.bias.data, 0, stride),
        "out": out.detach(),
        "x_grad": x_grad,
        "weight_grad": _gather(layer.weight.grad, 0, stride),
        "bias_grad": _gather(layer.bias.grad, 0, stride),
    }


def _row(group, rank, sequence_parallel=False):
    layer = _build(RowParallelLinear, OUT, IN, tp_group=group, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(IN, dtype=torch.float32))
    grad_full = X
    x = split_for_rank(GRAD, 2, rank, 2).clone().requires_grad_(True)  # this rank's input features
    out, _ = layer(x)
    out.backward(split_for_rank(grad_full, 0, rank, 2) if sequence_parallel else grad_full)
    return {
        "weight": _gather(layer.weight.data, 1),
        "bias": layer.bias.data.clone(),
        "out": _gather(out.detach(), 0) if sequence_parallel else out.detach(),
        "x_grad": _gather(x.grad, 2),
        "weight_grad": _gather(layer.weight.grad, 1),
        "bias_grad": layer.bias.grad.clone(),
    }


def _embedding(group, rank, reduce_scatter=False):
    layer = _build(
        VocabParallelEmbedding,
        10,
        6,
        tp_group=group,
        unpadded_num_embeddings=9,
        reduce_scatter_embeddings=reduce_scatter,
    )
    out = layer(IDS)
    if reduce_scatter:  # [s/tp, b, h] -> back to [b, s, h] for comparison
        out.backward(split_for_rank(EMB_GRAD.transpose(0, 1), 0, rank, 2))
        out = _gather(out.detach(), 0).transpose(0, 1)
    else:
        out.backward(EMB_GRAD)
    return {
        "weight": _gather(layer.weight.data, 0),
        "out": out.detach(),
        "weight_grad": _gather(layer.weight.grad, 0),
        "range": (layer.vocab_start_index, layer.vocab_end_index),
    }


def _layers_worker(rank, world_size):
    group = dist.group.WORLD
    return {
        "column": _column(group, rank),
        "column_stride2": _column(group, rank, stride=2),
        "column_gather": _column(group, rank, gather_output=True),
        "column_sp": _column(group, rank, sequence_parallel=True),
        "row": _row(group, rank),
        "row_sp": _row(group, rank, sequence_parallel=True),
        "embedding": _embedding(group, rank),
        "embedding_sp": _embedding(group, rank, reduce_scatter=True),
    }


@pytest.fixture(scope="module")
def results():
    return run_distributed(_layers_worker, 2)


@pytest.mark.parametrize("variant", ["column", "column_stride2", "column_gather", "column_sp"])
def test_column_parallel_linear_equals_full_linear(results, variant):
    full = _build(ColumnParallelLinear, IN, OUT)
    for got in (r[variant] for r in results):
        assert torch.equal(got["weight"], full.weight.data)  # same seed, same full weight at TP=2
        weight, bias = got["weight"].requires_grad_(True), got["bias"].requires_grad_(True)
        x = X.clone().requires_grad_(True)
        out = F.linear(x, weight, bias)
        out.backward(GRAD)
        torch.testing.assert_close(got["out"], out.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(got["x_grad"], x.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(got["weight_grad"], weight.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(got["bias_grad"], bias.grad, atol=1e-6, rtol=0)


def test_stride_two_shards_hold_matching_halves():
    full = torch.arange(8.0)
    assert split_for_rank(full, 0, 0, 2, stride=2).tolist() == [0, 1, 4, 5]
    assert split_for_rank(full, 0, 1, 2, stride=2).tolist() == [2, 3, 6, 7]
    assert torch.equal(merge_shards([torch.tensor([0.0, 1, 4, 5]), torch.tensor([2.0, 3, 6, 7])], 0, 2), full)


@pytest.mark.parametrize("variant", ["row", "row_sp"])
def test_row_parallel_linear_adds_the_bias_once_after_the_reduction(results, variant):
    full = _build(RowParallelLinear, OUT, IN)
    for got in results:
        assert torch.equal(got[variant]["weight"], full.weight.data)
        weight = got[variant]["weight"].requires_grad_(True)
        bias = got[variant]["bias"].requires_grad_(True)
        x = GRAD.clone().requires_grad_(True)
        out = F.linear(x, weight, bias)
        out.backward(X)
        torch.testing.assert_close(got[variant]["out"], out.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(got[variant]["x_grad"], x.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[variant]["weight_grad"], weight.grad, atol=1e-6, rtol=0)
        # Under SP each rank adds the bias to its half of the sequence; the gradient is still the full one.
        torch.testing.assert_close(got[variant]["bias_grad"], bias.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["embedding", "embedding_sp"])
def test_vocab_parallel_embedding_equals_full_lookup(results, variant):
    full = _build(VocabParallelEmbedding, 10, 6, unpadded_num_embeddings=9)
    assert torch.count_nonzero(full.weight[9]) == 0  # the padding row
    assert [r[variant]["range"] for r in results] == [(0, 5), (5, 10)]
    for got in results:
        got = got[variant]
        assert torch.equal(got["weight"], full.weight.data)
        weight = got["weight"].requires_grad_(True)
        out = F.embedding(IDS, weight)
        out.backward(EMB_GRAD)
        torch.testing.assert_close(got["out"], out.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(got["weight_grad"], weight.grad, atol=1e-6, rtol=0)


def test_layer_attributes_and_shapes_single_process():
    column = _build(ColumnParallelLinear, IN, OUT, stride=2)
    row = _build(RowParallelLinear, OUT, IN)
    emb = _build(VocabParallelEmbedding, 10, 6)
    assert (
        column.weight.tensor_model_parallel,
        column.weight.partition_dim,
        column.weight.partition_stride,
    ) == (
        True,
        0,
        2,
    )
    assert column.bias.tensor_model_parallel and column.bias.partition_dim == 0
    assert (row.weight.tensor_model_parallel, row.weight.partition_dim) == (True, 1)
    assert row.bias.tensor_model_parallel is False
    assert (emb.weight.tensor_model_parallel, emb.weight.partition_dim) == (True, 0)
    tied = ColumnParallelLinear(
        6, 10, init_method=init_method_normal(0.02), bias=False, skip_weight_param_allocation=True
    )
    assert list(tied.parameters()) == []
    out, _ = tied(X[..., :6], weight=emb.weight)
    torch.testing.assert_close(out, X[..., :6] @ emb.weight.t())
    with pytest.raises(ValueError, match="has no weight of its own"):
        tied(X[..., :6])
