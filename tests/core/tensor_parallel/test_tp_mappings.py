"""The TP/SP mappings on 2 real gloo processes: forward values and gradients, exactly."""

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_lite.core import tensor_parallel as tp

X = torch.arange(48, dtype=torch.float32).view(4, 2, 6)  # [s, b, h], the same on every rank
G = torch.arange(48, dtype=torch.float32).view(4, 2, 6) * 0.5 + 1  # an upstream gradient


def _apply(fn, x, grad, *args):
    x = x.clone().requires_grad_(True)
    y = fn(x, dist.group.WORLD, *args)
    y.backward(grad)
    return y.detach(), x.grad


def _mappings_worker(rank, world_size):
    scale = rank + 1.0  # makes each rank's contribution visible in sums
    last = slice(rank * 3, rank * 3 + 3)
    first = slice(rank * 2, rank * 2 + 2)
    return {
        "copy_to": _apply(tp.copy_to_tensor_model_parallel_region, X, G * scale),
        "reduce_from": _apply(tp.reduce_from_tensor_model_parallel_region, X * scale, G),
        "scatter_to": _apply(tp.scatter_to_tensor_model_parallel_region, X, G[..., last] * scale),
        "gather_from": _apply(tp.gather_from_tensor_model_parallel_region, X[..., last], G),
        "scatter_to_sp": _apply(tp.scatter_to_sequence_parallel_region, X, G[first] * scale),
        "gather_from_sp": _apply(tp.gather_from_sequence_parallel_region, X[first], G * scale),
        "gather_from_sp_replicated": _apply(
            tp.gather_from_sequence_parallel_region, X[first], G * scale, False
        ),
        "reduce_scatter_to_sp": _apply(tp.reduce_scatter_to_sequence_parallel_region, X * scale, G[first]),
    }


@pytest.fixture(scope="module")
def results():
    return run_distributed(_mappings_worker, 2)


def test_mappings_forward_and_backward(results):
    for rank, got in enumerate(results):
        scale = rank + 1.0
        last = slice(rank * 3, rank * 3 + 3)
        first = slice(rank * 2, rank * 2 + 2)
        both = torch.cat([G[..., 0:3] * 1.0, G[..., 3:6] * 2.0], dim=-1)  # each rank's scaled chunk
        expected = {
            "copy_to": (X, G * 3),  # gradient summed over ranks: 1 + 2
            "reduce_from": (X * 3, G),
            "scatter_to": (X[..., last], both),
            "gather_from": (X, G[..., last]),
            "scatter_to_sp": (X[first], torch.cat([G[0:2] * 1.0, G[2:4] * 2.0])),
            "gather_from_sp": (X, (G * 3)[first]),  # reduce-scatter of the gradient
            "gather_from_sp_replicated": (X, (G * scale)[first]),  # just this rank's slice
            "reduce_scatter_to_sp": ((X * 3)[first], G),  # gradient all-gathered from both ranks
        }
        for name, (value, grad) in expected.items():
            assert torch.equal(got[name][0], value), (rank, name, "forward")
            assert torch.equal(got[name][1], grad), (rank, name, "backward")


@pytest.mark.parametrize(
    "fn",
    [
        tp.copy_to_tensor_model_parallel_region,
        tp.reduce_from_tensor_model_parallel_region,
        tp.scatter_to_tensor_model_parallel_region,
        tp.gather_from_tensor_model_parallel_region,
        tp.scatter_to_sequence_parallel_region,
        tp.gather_from_sequence_parallel_region,
        tp.reduce_scatter_to_sequence_parallel_region,
    ],
)
def test_mappings_are_the_identity_without_a_group(fn):
    x = X.clone().requires_grad_(True)
    y = fn(x, None)
    assert y is x
