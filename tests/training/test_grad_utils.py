"""Global gradient norm and clipping under tensor parallelism, sequence-parallel grad reduction, fp16 loss scaling."""

import math

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.grad_utils import (
    LossScaler,
    clip_grad_norm,
    grad_norm_squared,
    params_norm,
)


def _param(values, sharded: bool) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(len(values)))
    param.grad = torch.tensor(values, dtype=torch.float32)
    param.tensor_model_parallel = sharded
    return param


def test_norm_and_clipping_on_one_process():
    params = [_param([3.0, 0.0], False), _param([0.0, 4.0, 12.0], True)]
    norm = clip_grad_norm(params, max_norm=1.0)
    assert norm == pytest.approx(13.0, rel=1e-7)
    coeff = 1.0 / (13.0 + 1e-6)
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 0.0]) * coeff)
    torch.testing.assert_close(params[1].grad, torch.tensor([0.0, 4.0, 12.0]) * coeff)


def test_norm_below_max_leaves_grads_and_zero_disables_clipping():
    small = [_param([0.3, 0.4], False)]
    assert clip_grad_norm(small, max_norm=1.0) == pytest.approx(0.5)
    assert small[0].grad.tolist() == pytest.approx([0.3, 0.4])
    big = [_param([30.0, 40.0], False)]
    assert clip_grad_norm(big, max_norm=0.0) == pytest.approx(50.0)
    assert big[0].grad.tolist() == [30.0, 40.0]


def test_non_finite_norm_is_reported_and_grads_untouched():
    params = [_param([1.0, float("nan")], False), _param([2.0], False)]
    assert math.isnan(clip_grad_norm(params, max_norm=1.0))
    assert params[1].grad.tolist() == [2.0]
    params = [_param([float("inf")], False)]
    assert math.isinf(clip_grad_norm(params, max_norm=1.0))


def _tp_norm_worker(rank: int, world_size: int) -> dict:
    pstate = ParallelState(rank=rank, world_size=2, tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
    # Full sharded gradient [1, 2, 3, 4] split in halves over the two TP ranks; replicated [2, 2] on both.
    shard = [1.0, 2.0] if rank == 0 else [3.0, 4.0]
    params = [_param(shard, True), _param([2.0, 2.0], False)]
    squared = grad_norm_squared(params, pstate).item()
    norm = clip_grad_norm(params, max_norm=2.0, pstate=pstate)
    weights = [torch.nn.Parameter(torch.tensor(shard)), torch.nn.Parameter(torch.tensor([2.0, 2.0]))]
    weights[0].tensor_model_parallel = True
    weights[1].tensor_model_parallel = False
    return {
        "squared": squared,
        "norm": norm,
        "grads": [p.grad for p in params],
        "params_norm": params_norm(weights, pstate),
    }


def test_tensor_parallel_norm_counts_shards_once_and_replicas_once():
    results = run_distributed(_tp_norm_worker, 2)
    expected_sq = 1 + 4 + 9 + 16 + 4 + 4  # = 38: the full model's gradient, replicated part counted once
    for r in results:
        assert r["squared"] == pytest.approx(expected_sq)
        assert r["norm"] == pytest.approx(math.sqrt(expected_sq))
        assert r["params_norm"] == pytest.approx(math.sqrt(expected_sq))
    coeff = 2.0 / (math.sqrt(38) + 1e-6)
    torch.testing.assert_close(results[0]["grads"][0], torch.tensor([1.0, 2.0]) * coeff)
    torch.testing.assert_close(results[1]["grads"][0], torch.tensor([3.0, 4.0]) * coeff)
    torch.testing.assert_close(results[1]["grads"][1], torch.tensor([2.0, 2.0]) * coeff)


def test_dynamic_loss_scale_hysteresis_backoff_and_growth():
    scaler = LossScaler(2.0**16, dynamic=True, min_scale=2.0**13, growth_interval=3, hysteresis=2)
    history = []
    for found_inf in [True, True, True, False, False, False, True, True, True, True, True]:
        scaler.update(found_inf)
        history.append(math.log2(scaler.scale))
    # first overflow spends the hysteresis; later ones halve; 3 clean steps double and refill hysteresis;
    # then one overflow is tolerated again, and the scale never drops below the minimum (2**13).
    assert history == [16, 15, 14, 14, 14, 15, 15, 14, 13, 13, 13]
    assert scaler.at_minimum
    state = scaler.state_dict()
    other = LossScaler(1.0, dynamic=True, min_scale=2.0**13, growth_interval=3, hysteresis=2)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_unscale_divides_grads_by_the_scale():
    scaler = LossScaler(1024.0)
    params = [_param([1024.0, -2048.0], False)]
    scaler.unscale_(params)
    assert params[0].grad.tolist() == [1.0, -2.0]
    scaler.update(True)  # static scale never moves
    assert scaler.scale == 1024.0 and scaler.at_minimum
