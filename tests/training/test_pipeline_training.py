"""Pipeline-parallel training (real gloo processes) reproduces the single-process losses and grad norms."""

import pytest
from dist_utils import run_distributed
from megatron_log import MEGATRON_LINE

from megatron_lite.arguments import parse_config
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

# 4 layers, 8 micro batches of 1 sequence per step (4 per rank at DP=2), dropout off.
BASE = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --vocab-size 250 "
    "--micro-batch-size 1 --global-batch-size 8 --lr 3e-3 --lr-warmup-iters 2 --train-iters 20 --num-workers 0 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 1 --eval-interval 10 --log-interval 10 "
    "--peak-tflops 1 --log-params-norm --log-num-zeros-in-grad"
)
UNTIED = "--untie-embeddings-and-output-weights"
RTOL = 1e-5


def _train(extra: str) -> dict:
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(
        cfg.tensor_model_parallel_size, pipeline_model_parallel_size=cfg.pipeline_model_parallel_size
    )
    result = pretrain(cfg, pstate)
    return {
        "losses": [v for _, v in result.losses],
        "grad_norms": [v for _, v in result.grad_norms],
        "validation": [v for _, v in result.validation_losses],
        "lines": result.log_lines,
        "coords": (pstate.pp_rank, pstate.dp_rank, pstate.tp_rank),
    }


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    return {name: _train(extra) for name, extra in layouts.items()}


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process run, tied and untied embeddings."""
    return {tied: _train("" if tied else UNTIED) for tied in (True, False)}


def _max_rel(values: list[float], reference: list[float]) -> float:
    assert len(values) == len(reference) > 0
    return max(abs(a - b) / abs(b) for a, b in zip(values, reference))


def _assert_matches(results: list[dict], name: str, reference: dict) -> None:
    ref = reference["untied" not in name]
    for result in results:
        run = result[name]
        assert len(run["losses"]) == 20
        assert _max_rel(run["losses"], ref["losses"]) < RTOL, name
        assert _max_rel(run["grad_norms"], ref["grad_norms"]) < RTOL, name
        assert _max_rel(run["validation"], ref["validation"]) < RTOL, name


def test_reference_curve_moves(reference):
    # The curve must move well beyond the tolerance, or matching it would prove nothing about the updates.
    losses = reference[True]["losses"]
    assert abs(losses[-1] - losses[0]) / losses[0] > 100 * RTOL
    assert reference[True]["losses"] != reference[False]["losses"]


def test_pp2_matches_one_process_tied_and_untied(reference):
    layouts = {
        "pp2": "--pipeline-model-parallel-size 2",
        "pp2-untied": f"--pipeline-model-parallel-size 2 {UNTIED}",
    }
    results = run_distributed(_layouts_worker, 2, layouts)
    for name in layouts:
        _assert_matches(results, name, reference)
        # The last rank (last stage) prints Megatron's line, with the loss.
        assert results[0][name]["lines"] == [] or all("lm loss" not in x for x in results[0][name]["lines"])
        fields = [MEGATRON_LINE.match(line) for line in results[1][name]["lines"]]
        fields = [f for f in fields if f is not None]
        assert [f["iteration"] for f in fields] == ["10", "20"]
        # params norm and num zeros cover all stages (the tied copy counted once), as in one process.
        ref = [MEGATRON_LINE.match(line) for line in reference["untied" not in name]["lines"]]
        ref = [f for f in ref if f is not None]
        assert [(f["params_norm"], f["num_zeros"]) for f in fields] == [
            (f["params_norm"], f["num_zeros"]) for f in ref
        ]
    assert [r["pp2"]["coords"] for r in results] == [(0, 0, 0), (1, 0, 0)]


@pytest.mark.slow
def test_pp4_interleaved_and_uneven_match_one_process(reference):
    layouts = {
        "pp4": "--pipeline-model-parallel-size 4",
        "pp4-untied": f"--pipeline-model-parallel-size 4 {UNTIED}",
    }
    results = run_distributed(_layouts_worker, 4, layouts)
    for name in layouts:
        _assert_matches(results, name, reference)
    layouts = {
        "pp2-vp2": "--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2",
        "pp2-vp2-untied": f"--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 {UNTIED}",
        "pp2-uneven": "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 1",
        "pp2-account": "--pipeline-model-parallel-size 2 --account-for-embedding-in-pipeline-split "
        "--account-for-loss-in-pipeline-split",
        "pp2-recompute-full": "--pipeline-model-parallel-size 2 --recompute-granularity full "
        "--recompute-method uniform",
        "pp2-recompute-selective": "--pipeline-model-parallel-size 2 --recompute-activations",
    }
    results = run_distributed(_layouts_worker, 2, layouts)
    for name in layouts:
        _assert_matches(results, name, reference)


@pytest.mark.slow
def test_pp2_with_tp2_and_dp2_matches_one_process(reference):
    layouts = {
        "pp2-tp2": "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2",
        "pp2-tp2-untied": f"--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 {UNTIED}",
        "pp2-tp2-sp": "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel",
        "pp2-dp2": "--pipeline-model-parallel-size 2",
        "pp2-dp2-distributed-optimizer": "--pipeline-model-parallel-size 2 --use-distributed-optimizer",
    }
    results = run_distributed(_layouts_worker, 4, layouts)
    for name in layouts:
        _assert_matches(results, name, reference)
    # Megatron's rank order: TP ranks adjacent, then DP, then PP.
    assert [r["pp2-tp2"]["coords"] for r in results] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert [r["pp2-dp2"]["coords"] for r in results] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


@pytest.mark.slow
def test_pp2_sequence_parallel_with_distributed_optimizer_matches_one_process(reference):
    layouts = {
        "pp2-tp2-dp2-sp-dist-opt": "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 "
        "--sequence-parallel --use-distributed-optimizer",
    }
    results = run_distributed(_layouts_worker, 8, layouts, timeout=600)
    for name in layouts:
        _assert_matches(results, name, reference)


@pytest.mark.slow
def test_pp2_fp16_skips_the_same_overflowing_steps_as_one_process():
    # Dynamic loss scaling from 2**32 overflows first; every stage must agree to skip those steps.
    fp16 = "--fp16 --initial-loss-scale 4294967296 --train-iters 12 --log-interval 1"
    reference = _train(fp16)
    results = run_distributed(_layouts_worker, 2, {"pp2-fp16": f"--pipeline-model-parallel-size 2 {fp16}"})
    ref_fields = [f for f in map(MEGATRON_LINE.match, reference["lines"]) if f is not None]
    fields = [f for f in map(MEGATRON_LINE.match, results[1]["pp2-fp16"]["lines"]) if f is not None]
    scales = [(f["loss_scale"], f["skipped"]) for f in ref_fields]
    assert [(f["loss_scale"], f["skipped"]) for f in fields] == scales
    assert int(scales[-1][1]) > 0 and scales[0][0] != scales[-1][0]  # some steps were skipped
    for result in results:
        assert _max_rel(result["pp2-fp16"]["losses"], reference["losses"]) < RTOL
