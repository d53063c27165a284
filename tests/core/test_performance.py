"""The fp32 matmul path chooser: faster paths are taken only with fp32-level error, and every choice is said."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from megatron_lite.core import performance
from megatron_lite.core.performance import (
    FP32_MAX_RELATIVE_ERROR,
    MatmulChoice,
    PathMeasurement,
    choose_matmul_precision,
    configure_matmul_precision,
    matmul_precision,
    relative_error,
    select_matmul_precision,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_precision():
    with matmul_precision(torch.get_float32_matmul_precision()):
        yield


def test_matmul_precision_is_restored_even_after_an_error():
    torch.set_float32_matmul_precision("highest")
    with pytest.raises(RuntimeError, match="inside"):
        with matmul_precision("medium"):
            assert torch.get_float32_matmul_precision() == "medium"
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.fixture(scope="module")
def errors():
    """Real errors of this machine's fp32 product and of a product computed in bf16."""
    return {
        "fp32": relative_error(F.linear, CPU),
        "bf16": relative_error(lambda a, b: F.linear(a.bfloat16(), b.bfloat16()), CPU),
    }


def test_error_probe_separates_fp32_from_bf16(errors):
    assert errors["fp32"] < 2e-6  # a k=1024 fp32 dot product: ~1e-7..1e-6
    assert errors["bf16"] > 1e-3  # bf16 keeps 8 bits of mantissa: ~3e-3
    assert errors["fp32"] < FP32_MAX_RELATIVE_ERROR < errors["bf16"]


def test_faster_path_with_bf16_level_error_is_rejected(errors):
    baseline = PathMeasurement("highest", errors["fp32"], "mkl", seconds=1.0)
    bf16_path = PathMeasurement("medium", errors["bf16"], "onednn-bf16", seconds=0.4)  # 2.5x faster
    choice = choose_matmul_precision(baseline, [bf16_path])
    assert choice.precision == "highest"
    assert "medium rejected" in choice.description and "error above fp32's 1e-05" in choice.description


def test_faster_path_with_fp32_level_error_is_chosen(errors):
    baseline = PathMeasurement("highest", errors["fp32"], "mkl", seconds=1.0)
    candidates = [
        PathMeasurement("high", errors["bf16"], "tf32", seconds=0.3),  # fastest, but not fp32
        PathMeasurement("medium", errors["fp32"] * 2, "onednn-fp32", seconds=0.45),
    ]
    choice = choose_matmul_precision(baseline, candidates)
    assert choice.precision == "medium"
    assert "medium chosen" in choice.description and "2.22x" in choice.description
    assert "high rejected" in choice.description


def test_small_gains_and_unchanged_kernels_are_not_taken(errors):
    baseline = PathMeasurement("highest", errors["fp32"], "mkl", seconds=1.0)
    marginal = PathMeasurement("high", errors["fp32"], "other", seconds=1 / 1.05)
    same_kernel = PathMeasurement(
        "medium", errors["fp32"], "mkl", seconds=0.5
    )  # noise made it look 2x faster
    choice = choose_matmul_precision(baseline, [marginal, same_kernel])
    assert choice.precision == "highest"
    assert "1.05x < 1.10x" in choice.description
    assert "medium not chosen: same results as highest (same kernel)" in choice.description


def _fake_measure(errors, calls, speeds, kernels):
    def measure(precision, device, timed):
        calls.append((precision, timed))
        error = errors["bf16"] if kernels[precision] == "bf16" else errors["fp32"]
        return PathMeasurement(precision, error, kernels[precision], speeds[precision] if timed else math.nan)

    return measure


def test_auto_times_only_paths_that_change_the_kernel_and_keep_fp32_error(errors):
    calls = []
    kernels = {"highest": "mkl", "high": "bf16", "medium": "onednn"}
    measure = _fake_measure(errors, calls, {"highest": 1.0, "high": 0.5, "medium": 0.7}, kernels)
    torch.set_float32_matmul_precision("high")
    choice = select_matmul_precision(CPU, "auto", measure=measure)
    assert choice.precision == "medium" and "medium chosen: " in choice.description
    assert "high rejected: rel. error " in choice.description  # bf16-level: rejected untimed
    probes = [("highest", False), ("high", False), ("medium", False)]
    assert calls == probes + [("highest", True), ("medium", True)] * 2  # two interleaved rounds
    assert torch.get_float32_matmul_precision() == "high"  # selecting does not apply


def test_auto_times_nothing_when_no_setting_changes_the_kernel(errors):
    calls = []
    kernels = {"highest": "mkl", "high": "mkl", "medium": "mkl"}
    measure = _fake_measure(errors, calls, {"highest": 1.0, "high": 0.5, "medium": 0.5}, kernels)
    choice = select_matmul_precision(CPU, "auto", measure=measure)
    assert choice.precision == "highest"
    assert all(not timed for _, timed in calls) and len(calls) == 3
    assert choice.description.count("(same kernel)") == 2


def test_auto_on_this_machine_picks_an_fp32_level_path():
    description = configure_matmul_precision("cpu", "auto")
    chosen = torch.get_float32_matmul_precision()
    choice = select_matmul_precision(CPU, "auto")  # cached: the same measurement
    assert choice.precision == chosen and choice.description == description
    measured = {m.precision: m for m in choice.measurements}
    assert measured[chosen].relative_error <= FP32_MAX_RELATIVE_ERROR
    assert description.startswith(f"fp32 matmul precision: {chosen} (auto; highest (torch default): ")


def test_explicit_policy_is_applied_and_its_error_reported():
    description = configure_matmul_precision(CPU, "medium")
    assert torch.get_float32_matmul_precision() == "medium"
    assert description.startswith("fp32 matmul precision: medium (set explicitly; ")
    (measured,) = select_matmul_precision(CPU, "medium").measurements  # cached: the same measurement
    # Whatever this CPU's "medium" is, the line says whether its error is fp32's.
    quality = "fp32-level" if measured.relative_error <= FP32_MAX_RELATIVE_ERROR else "NOT fp32-level"
    assert description.endswith(f"rel. error {measured.relative_error:.1e}, {quality} error)")
    configure_matmul_precision(CPU, "highest")
    assert torch.get_float32_matmul_precision() == "highest"


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="'fast' is not one of auto, highest, high, medium"):
        select_matmul_precision(CPU, "fast")


def _broadcast_worker(rank, world_size):
    # Pretend the ranks measured differently: rank 1 alone found "medium" faster.
    mine = "medium" if rank == 1 else "highest"
    key = (str(CPU), torch.get_num_threads(), "auto")
    performance._CACHE[key] = MatmulChoice(mine, f"measured {mine}", ())
    description = configure_matmul_precision(CPU, "auto", group=dist.group.WORLD)
    return torch.get_float32_matmul_precision(), description


def test_rank_zero_choice_is_used_on_every_rank():
    (p0, d0), (p1, d1) = run_distributed(_broadcast_worker, 2)
    assert p0 == p1 == "highest"
    assert d0 == "measured highest"
    assert d1 == "fp32 matmul precision: highest (rank 0's choice; this rank alone: measured medium)"
