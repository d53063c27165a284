"""The step-time model (model_stats.py --estimate): pinned against Narayanan et al. 2021's Table 1, and its parts by hand."""

import dataclasses
import json
import math
from functools import cache
from pathlib import Path

import pytest

from megatron_lite.errors import UserError
from megatron_lite.model_stats import build_sizing_config, model_stats_main
from megatron_lite.step_time_model import (
    DEVICES,
    GEMM_EFFICIENCY,
    estimate_step_time,
    get_device,
)

TABLE = json.loads((Path(__file__).resolve().parents[1] / "data" / "narayanan2021_table1.json").read_text())
A100 = DEVICES["A100-80GB"]


def row_flags(row: dict) -> list[str]:
    """The row's launch as Megatron's flags (sc21/run_table_1.sh: fp16, full uniform recompute of every
    layer, torch DDP (overlapped) without pipelining, local DDP (not overlapped) with it)."""
    flags = [
        *("--num-layers", str(row["layers"]), "--hidden-size", str(row["hidden"])),
        *("--num-attention-heads", str(row["heads"]), "--seq-length", str(TABLE["seq_length"])),
        *("--max-position-embeddings", str(TABLE["seq_length"]), "--vocab-size", str(TABLE["vocab_size"])),
        *("--tensor-model-parallel-size", str(row["tp"]), "--pipeline-model-parallel-size", str(row["pp"])),
        *("--world-size", str(row["gpus"]), "--micro-batch-size", str(row["micro_batch"])),
        *("--global-batch-size", str(row["global_batch"]), "--fp16"),
        *("--recompute-granularity", "full", "--recompute-method", "uniform"),
    ]
    if row["layers_per_virtual_stage"]:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(row["layers_per_virtual_stage"])]
    if row["ddp"] == "torch":
        flags.append("--overlap-grad-reduce")
    return flags


@cache
def row_config(index: int):
    return build_sizing_config(row_flags(TABLE["rows"][index]))[0]


def relative_errors(efficiency: float = GEMM_EFFICIENCY, ablate: frozenset = frozenset()) -> list[float]:
    """Predicted / published TFLOP/s per GPU - 1 for each row; the paper counts the recomputed forward
    (and its fp16 runs reduced 16-bit gradients)."""
    device = dataclasses.replace(A100, gemm_efficiency=efficiency)
    out = []
    for i, row in enumerate(TABLE["rows"]):
        est = estimate_step_time(row_config(i), device, grad_reduce_bytes=2, ablate=ablate)
        out.append(est.hardware_tflops_per_gpu / row["tflops_per_gpu"] - 1)
    return out


def rms_log_error(errors: list[float]) -> float:
    return math.sqrt(sum(math.log1p(e) ** 2 for e in errors) / len(errors))


def test_table_data_is_consistent():
    rows = TABLE["rows"]
    assert len(rows) == 10 and [r["gpus"] for r in rows][-1] == 3072
    for row in rows:
        # Aggregate = per GPU x GPUs (the table rounds per-GPU figures); % of peak against 312 TFLOP/s.
        assert row["aggregate_pflops"] == pytest.approx(row["tflops_per_gpu"] * row["gpus"] / 1000, rel=0.01)
        assert row["percent_of_peak"] == pytest.approx(100 * row["tflops_per_gpu"] / 312, abs=0.6)
        assert row["global_batch"] % (row["micro_batch"] * row["gpus"] // (row["tp"] * row["pp"])) == 0


def test_narayanan2021_table1_within_20_percent():
    errors = relative_errors()
    for row, error in zip(TABLE["rows"], errors):
        assert abs(error) < 0.20, (row["params_b"], error)


def test_table1_fit_is_tight_and_bubble_tp_and_memory_each_matter():
    # The model with every part is within a few percent (RMS of log ratios); dropping the pipeline
    # bubble, the TP collectives or the memory-bound kernels each breaks that.
    assert rms_log_error(relative_errors()) < 0.04
    for part in ("bubble", "tp", "memory"):
        assert rms_log_error(relative_errors(ablate=frozenset({part}))) > 0.04, part
    # The 1T run (PP 64, 512 micro batches, no interleaving) adds (p - 1)/m = 12% to its steady state
    # in the bubble: without it the prediction rises by about that much (DP and optimizer stay).
    last = len(TABLE["rows"]) - 1
    with_bubble = relative_errors()[last]
    without = relative_errors(ablate=frozenset({"bubble"}))[last]
    assert (1 + without) / (1 + with_bubble) == pytest.approx(1 + 63 / 512, rel=0.002)


def test_gemm_efficiency_is_the_one_constant_fitted_to_table1():
    grid = [0.60 + 0.005 * i for i in range(31)]
    best = min(grid, key=lambda e: rms_log_error(relative_errors(e)))
    assert best == pytest.approx(GEMM_EFFICIENCY, abs=1e-9)


def _small(*extra: str):
    flags = ["--num-layers", "8", "--hidden-size", "4096", "--num-attention-heads", "32"]
    flags += ["--seq-length", "2048", "--vocab-size", "51200", "--bf16", "--attention-dropout", "0"]
    return build_sizing_config(flags + list(extra))[0]


def test_tp_collectives_and_bubble_by_hand():
    cfg = _small(
        "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "2", "--world-size", "16"
    )
    m = cfg.num_microbatches
    est = estimate_step_time(cfg, A100)
    # Per layer per micro batch: 2 all-reduces forward + 2 backward of s·b·h bf16 values, ring over
    # 8 GPUs on NVLink at 80% of 300 GB/s: 2·(7/8)·bytes/bw + 2·7 steps x 3 µs; + 2 for the embedding
    # and logits; 4 layers on the stage.
    message = 2 * 2048 * 4096
    ring = 2 * 7 / 8 * message / 240e9 + 14 * 3e-6
    assert est.breakdown["TP/SP collectives"] == pytest.approx(m * (4 * 4 + 2) * ring)
    steady = sum(v for k, v in est.breakdown.items() if k.split()[0] not in ("pipeline", "DP", "optimizer"))
    assert est.breakdown["pipeline bubble"] == pytest.approx(steady * (2 - 1) / m)


def test_interleaving_shrinks_the_bubble_and_overlap_hides_dp():
    flags = ["--pipeline-model-parallel-size", "4", "--world-size", "16", "--global-batch-size", "32"]
    plain = estimate_step_time(_small(*flags), A100)
    inter = estimate_step_time(_small(*flags, "--num-layers-per-virtual-pipeline-stage", "1"), A100)
    assert inter.breakdown["pipeline bubble"] < plain.breakdown["pipeline bubble"] / 1.9
    dp_flags = ["--world-size", "64", "--tensor-model-parallel-size", "8", "--micro-batch-size", "8"]
    exposed = estimate_step_time(_small(*dp_flags), A100).breakdown["DP gradient reduction (exposed)"]
    hidden = estimate_step_time(_small(*dp_flags, "--overlap-grad-reduce"), A100).breakdown[
        "DP gradient reduction (exposed)"
    ]
    assert 0 < hidden < exposed / 2


def test_h200_differs_from_h100_only_in_memory_bound_time():
    cfg = _small()
    h100, h200 = estimate_step_time(cfg, get_device("H100")), estimate_step_time(cfg, get_device("h200"))
    key = "memory-bound kernels"
    assert h200.breakdown[key] == pytest.approx(h100.breakdown[key] * 3350 / 4800)
    assert h200.breakdown["compute (GEMMs, attention)"] == h100.breakdown["compute (GEMMs, attention)"]
    assert h200.iteration_s < h100.iteration_s


def test_cli_estimate_and_unknown_device(capsys):
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    assert model_stats_main(flags + ["--vocab-size", "256", "--estimate", "A100-40GB"]) == 0
    out = capsys.readouterr().out
    assert "step-time estimate on A100-40GB (312 TFLOP/s peak" in out and "tokens/s" in out
    with pytest.raises(UserError, match="--estimate B200: unknown device; give one of A100-40GB"):
        model_stats_main(flags + ["--vocab-size", "256", "--estimate", "B200"])


def test_cpu_device_measures_this_machine():
    from megatron_lite.step_time_cpu import measure_cpu_device

    cfg = build_sizing_config(
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
        + ["--vocab-size", "256", "--micro-batch-size", "2"]
    )[0]
    device = measure_cpu_device(cfg, budget_s=0.1)
    assert device.gemm_efficiency == 1.0 and device.peak_tflops > 0 and device.attention_tflops > 0
    est = estimate_step_time(cfg, device)
    assert 0 < est.iteration_s < 10 and est.breakdown["memory-bound kernels"] > 0
