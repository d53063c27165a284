"""model_stats.py under --pipeline-model-parallel-size: per-stage parameters and memory, in-flight
activations of 1F1B and interleaving, and the pipeline bubble."""

import pytest

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.pipeline_parallel import PipelineSplit
from megatron_lite.model_stats import build_sizing_config, compute_stats, model_stats_main
from megatron_lite.model_stats_pipeline import in_flight_microbatches, pipeline_bubble, stage_stats

MODEL = "--num-layers 8 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --vocab-size 1000".split()


def _sizing(*flags: str):
    return build_sizing_config([*MODEL, *flags])[0]


def test_bubble_is_p_minus_1_over_m_plus_p_minus_1_and_shrinks_with_virtual_stages():
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubble(1, 8) == 0.0
    assert pipeline_bubble(4, 8, chunks=2) == pytest.approx(1.5 / 9.5)


def test_in_flight_micro_batches_follow_megatrons_warmup():
    # 1F1B: the first stage holds P forwards, the last one.
    assert [in_flight_microbatches(p, 4, 8) for p in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(0, 4, 2) == 2  # never more than the step's micro batches
    # Interleaved (Megatron's get_pp_rank_microbatches): (P - p - 1) * 2 + (V - 1) * P warmup, plus one.
    assert [in_flight_microbatches(p, 2, 8, chunks=2) for p in range(2)] == [5, 3]


@pytest.mark.parametrize("untie", [[], ["--untie-embeddings-and-output-weights"]])
def test_stage_parameters_are_the_models_split_by_stage(untie):
    cfg = _sizing(
        "--pipeline-model-parallel-size", "4", "--world-size", "4", "--global-batch-size", "8", *untie
    )
    stages = stage_stats(cfg, compute_stats(cfg))
    split = PipelineSplit.from_config(cfg)
    # The same count as the stage GPTModels hold (their weights built for real).
    for stage in stages:
        model = GPTModel(
            cfg,
            pre_process=stage.pp_rank == 0,
            post_process=stage.pp_rank == 3,
            layers=split.layer_range(stage.pp_rank),
        )
        assert stage.params_per_rank == sum(p.numel() for p in model.parameters())
    assert [s.in_flight for s in stages] == [4, 3, 2, 1]
    # The first stage keeps the most activations (P micro batches of its layers).
    assert stages[0].activation_bytes > stages[1].activation_bytes > stages[2].activation_bytes


def test_report_has_a_line_per_stage(capsys):
    flags = [
        *MODEL,
        "--pipeline-model-parallel-size",
        "2",
        "--num-virtual-stages-per-pipeline-rank",
        "2",
        "--world-size",
        "4",
        "--global-batch-size",
        "16",
    ]
    assert model_stats_main(flags) == 0
    out = capsys.readouterr().out
    assert "TP 1 x DP 2 x PP 2" in out
    assert "pipeline: 2 stages, interleaved 1F1B, 2 virtual stages per rank, 8 micro batches" in out
    assert "stage 0: layers 0-1, 4-5;" in out and "stage 1: layers 2-3, 6-7;" in out
    assert f"bubble {pipeline_bubble(2, 8, 2):.1%}" in out
