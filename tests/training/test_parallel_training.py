"""Data, tensor and sequence parallel training (real gloo processes) reproduce the single-process loss curve."""

import os
import signal

import pytest
from dist_utils import run_distributed
from megatron_log import MEGATRON_LINE

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

BASE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --vocab-size 250 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 2 --train-iters 20 --num-workers 0 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --log-interval 10 --peak-tflops 1"
)

# name -> (extra flags, TP size); each runs on the same 2 processes, one after the other.
TWO_RANK_LAYOUTS = {
    "dp2": ("", 1),
    "dp2-distributed-optimizer": ("--use-distributed-optimizer", 1),
    "tp2": ("--tensor-model-parallel-size 2", 2),
    "tp2-sequence-parallel": ("--tensor-model-parallel-size 2 --sequence-parallel", 2),
}
RTOL = 1e-5
SIGTERM_RUN = "dp2-sigterm-on-rank-1"


class _SigtermAtIteration3(GPTModel):
    """Sends SIGTERM to its own process during the third training iteration."""

    calls = 0

    def forward(self, *args, **kwargs):
        if self.training:
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(*args, **kwargs)


def _train(extra: str, tp: int, model_provider=None) -> dict:
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(tp)
    result = pretrain(cfg, pstate, model_provider=model_provider)
    return {
        "losses": [v for _, v in result.losses],
        "lines": result.log_lines,
        "micro_batches": cfg.num_microbatches,
        "dp": pstate.dp_size,
        "exit": (result.iteration, result.exit_reason),
    }


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    results = {name: _train(extra, tp) for name, (extra, tp) in layouts.items()}
    if world_size == 2:
        # Only rank 1 receives the signal; both ranks must still stop after the same iteration.
        results[SIGTERM_RUN] = _train("--exit-signal-handler", 1, _SigtermAtIteration3 if rank == 1 else None)
    return results


@pytest.fixture(scope="module")
def single_process_losses() -> list[float]:
    assert parse_config(BASE.split()).finalize(1).num_microbatches == 2
    losses = [v for _, v in pretrain(parse_config(BASE.split())).losses]
    # Random tokens teach little, but the updates must move the curve well beyond the tolerance,
    # or matching it would not show that the parallel runs update the weights the same way.
    frozen = [v for _, v in pretrain(parse_config(f"{BASE} --lr 0 --lr-warmup-iters 0".split())).losses]
    assert max(abs(a - b) / b for a, b in zip(losses, frozen)) > 100 * RTOL
    return losses


def _assert_curve(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == 20
    assert losses == pytest.approx(reference, rel=RTOL, abs=0)


def test_two_rank_layouts_match_one_process(single_process_losses):
    results = run_distributed(_layouts_worker, 2, TWO_RANK_LAYOUTS)
    for name in TWO_RANK_LAYOUTS:
        for rank in (0, 1):
            _assert_curve(results[rank][name]["losses"], single_process_losses)
        # Only the last rank prints Megatron's line; with 2 ranks it also gives tokens/s per rank.
        assert results[0][name]["lines"] == []
        fields = [MEGATRON_LINE.match(line).groupdict() for line in results[1][name]["lines"]]
        assert [f["iteration"] for f in fields] == ["10", "20"]
        assert all(f["tokens_per_rank"] is not None for f in fields)
    # DP=2 halves the accumulation: one micro batch per rank instead of two.
    assert results[0]["dp2"]["micro_batches"] == 1 and results[0]["tp2"]["micro_batches"] == 2
    assert [r[SIGTERM_RUN]["exit"] for r in results] == [(3, "signal"), (3, "signal")]


@pytest.mark.slow
def test_tp2_by_dp2_matches_one_process(single_process_losses):
    layouts = {"tp2xdp2": ("--tensor-model-parallel-size 2", 2)}
    results = run_distributed(_layouts_worker, 4, layouts)
    for rank in range(4):
        assert results[rank]["tp2xdp2"]["dp"] == 2
        _assert_curve(results[rank]["tp2xdp2"]["losses"], single_process_losses)
