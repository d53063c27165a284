"""MoE layers under pipeline parallelism over real gloo processes: the one-process loss curve, and the aux
losses of every stage in the log line (Megatron reduces its tracker over the pipeline group)."""

from __future__ import annotations

import re

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
# PP=2 x EP=2 on 4 ranks leaves DP=2: one sequence per micro batch, so that each stage has 2 micro batches.
ONE_SEQUENCE = "--micro-batch-size 1"
FOUR_RANKS = {
    "pp2-ep2": "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2",
    "pp2-ep2-alltoall-zero": (
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall "
        "--use-distributed-optimizer"
    ),
}


def _run(extra: str) -> tuple[list[float], list[str]]:
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(
        cfg.tensor_model_parallel_size, pipeline_model_parallel_size=cfg.pipeline_model_parallel_size
    )
    result = pretrain(cfg, pstate)
    return [v for _, v in result.losses], result.log_lines


def _logged(lines: list[str], name: str) -> list[float]:
    return [float(re.search(rf"\| {name}: ([0-9.E+-]+)", line).group(1)) for line in lines]


def _worker(rank: int, world_size: int, extra: str) -> tuple[list[float], list[str]]:
    return _run(extra)


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    return {name: _run(f"{ONE_SEQUENCE} {extra}") for name, extra in layouts.items()}


def test_two_stage_pipeline_with_moe_layers_matches_one_process():
    losses, lines = _run("")
    results = run_distributed(_worker, 2, "--pipeline-model-parallel-size 2", timeout=900)
    for rank_losses, _ in results:
        assert rank_losses == pytest.approx(losses, rel=RTOL, abs=0)
    # The last stage logs; its line holds both stages' layers (each stage holds one MoE layer).
    logged = results[-1][1]
    assert len(logged) == len(lines) == 2
    for name in ("load_balancing_loss", "z_loss"):
        assert _logged(logged, name) == pytest.approx(_logged(lines, name), rel=1e-5), name


@pytest.mark.slow
def test_pipeline_and_expert_parallel_match_one_process():
    losses, lines = _run(ONE_SEQUENCE)
    results = run_distributed(_layouts_worker, 4, FOUR_RANKS, timeout=900)
    for name in FOUR_RANKS:
        for rank_losses, _ in (r[name] for r in results):
            assert rank_losses == pytest.approx(losses, rel=RTOL, abs=0), name
        # The balancing loss is averaged over DP as Megatron does (the z-loss stays the logging rank's own).
        logged = results[-1][name][1]
        assert _logged(logged, "load_balancing_loss") == pytest.approx(
            _logged(lines, "load_balancing_loss"), rel=1e-5
        ), name


@pytest.mark.slow
def test_pipeline_stage_without_moe_layers_matches_one_process():
    # Layer 0 dense, layer 1 MoE: the first stage holds no experts at all.
    extra = "--moe-layer-freq ([0]*1+[1]*1)"
    losses, lines = _run(extra)
    results = run_distributed(_worker, 2, f"{extra} --pipeline-model-parallel-size 2", timeout=900)
    assert results[-1][0] == pytest.approx(losses, rel=RTOL, abs=0)
    assert _logged(results[-1][1], "load_balancing_loss") == pytest.approx(
        _logged(lines, "load_balancing_loss"), rel=1e-5
    )


@pytest.mark.slow
def test_interleaved_pipeline_with_moe_layers_matches_one_process():
    # Four MoE layers, two virtual stages per rank: each rank's chunks share its expert groups.
    extra = f"{ONE_SEQUENCE} --num-layers 4"
    losses, _ = _run(extra)
    vpp = "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"
    results = run_distributed(_worker, 2, f"{extra} {vpp}", timeout=900)
    assert results[-1][0] == pytest.approx(losses, rel=RTOL, abs=0)
