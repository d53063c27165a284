"""Expert parallelism over real gloo processes reproduces the one-process MoE loss curve, and checkpoints
move between EP sizes (experts are stored by global index)."""

from __future__ import annotations

import pytest
from dist_utils import run_distributed

from megatron_lite.arguments import parse_config
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

BASE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --vocab-size 250 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 2 --train-iters 20 --num-workers 0 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --log-interval 10 --peak-tflops 1 "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 --swiglu --disable-bias-linear "
    "--moe-aux-loss-coeff 0.1 --moe-z-loss-coeff 0.01"
)
RTOL = 1e-5
TWO_RANKS = {
    "ep2-allgather": ("--expert-model-parallel-size 2", 1),
    "ep2-alltoall": ("--expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall", 1),
}
FOUR_RANKS = {
    # Expert TP = TP = 2: each expert's ffn is split over the TP pair.
    "ep2-tp2-allgather": (
        "--expert-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel",
        2,
    ),
    "ep2-tp2-alltoall": (
        "--expert-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel "
        "--moe-token-dispatcher-type alltoall",
        2,
    ),
    # Expert TP 1: the experts are replicated over an expert-data-parallel group of 2.
    "ep2-tp2-etp1-alltoall": (
        "--expert-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel "
        "--expert-tensor-parallel-size 1 --moe-token-dispatcher-type alltoall",
        2,
    ),
}


def _train(extra: str, tp: int = 1) -> list[float]:
    cfg = parse_config(f"{BASE} {extra}".split())
    return [v for _, v in pretrain(cfg, initialize_parallel(tp)).losses]


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    return {name: _train(extra, tp) for name, (extra, tp) in layouts.items()}


def _worker(rank: int, world_size: int, extra: str) -> list[float]:
    return _train(extra)


@pytest.fixture(scope="module")
def single_process() -> list[float]:
    losses = _train("")
    # The curve must be sensitive to what EP could get wrong: the updates and the aux losses' gradient.
    frozen = _train("--lr 0 --lr-warmup-iters 0")
    without_aux = _train("--moe-aux-loss-coeff 0 --moe-z-loss-coeff 0")
    assert max(abs(a - b) / b for a, b in zip(losses, frozen)) > 100 * RTOL
    assert max(abs(a - b) / b for a, b in zip(losses, without_aux)) > 10 * RTOL
    return losses


@pytest.mark.slow
def test_two_rank_expert_parallel_matches_one_process(single_process):
    results = run_distributed(_layouts_worker, 2, TWO_RANKS, timeout=900)
    for name in TWO_RANKS:
        for rank_result in results:
            assert rank_result[name] == pytest.approx(single_process, rel=RTOL, abs=0), name


@pytest.mark.slow
def test_four_rank_expert_and_tensor_parallel_matches_one_process(single_process):
    results = run_distributed(_layouts_worker, 4, FOUR_RANKS, timeout=900)
    for name in FOUR_RANKS:
        assert results[-1][name] == pytest.approx(single_process, rel=RTOL, abs=0), name


@pytest.mark.slow
def test_checkpoints_move_between_expert_parallel_sizes(single_process, tmp_path):
    half = "--train-iters 10 --save-interval 10 --lr-decay-iters 20"
    first = run_distributed(
        _worker, 2, f"--expert-model-parallel-size 2 {half} --save {tmp_path}/ep2", timeout=900
    )
    resumed_at_ep1 = _train(f"--load {tmp_path}/ep2 --lr-decay-iters 20")
    assert first[0] + resumed_at_ep1 == pytest.approx(single_process, rel=RTOL, abs=0)
    _train(f"{half} --save {tmp_path}/ep1")
    resumed_at_ep2 = run_distributed(
        _worker, 2, f"--expert-model-parallel-size 2 --load {tmp_path}/ep1 --lr-decay-iters 20", timeout=900
    )
    assert resumed_at_ep2[0] == pytest.approx(single_process[10:], rel=RTOL, abs=0)
