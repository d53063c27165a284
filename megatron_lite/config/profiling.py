"""Profiling settings: Megatron's --profile window, the PyTorch profiler's options, nsys ranges on CUDA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail


@dataclass
class ProfilingArgs:
    """Profiling settings: Megatron's --profile window, the PyTorch profiler's options, nsys ranges on CUDA."""

    profile: bool = _f(
        False,
        "Profile iterations --profile-step-start to --profile-step-end: with torch.profiler "
        "(--use-pytorch-profiler), else as a CUDA profiler range for nsys (no effect on CPU).",
        group="profiling",
    )
    use_pytorch_profiler: bool = _f(
        False,
        "Use torch.profiler; its Chrome trace goes to <tensorboard-dir>/../torch_profile/.",
        group="profiling",
    )
    profile_step_start: int = _f(10, "First profiled iteration.", group="profiling")
    profile_step_end: int = _f(12, "Iteration at which profiling stops.", group="profiling")
    profile_ranks: list[int] = _f([], "Global ranks to profile (default: all).", nargs="+", group="profiling")
    pytorch_profiler_collect_shapes: bool = _f(False, "Record operator input shapes.", group="profiling")
    pytorch_profiler_collect_callstack: bool = _f(False, "Record Python call stacks.", group="profiling")
    record_shapes: bool = _f(False, "Record shapes in nsys NVTX ranges (CUDA).", group="profiling")


def check_profiling(cfg: Any) -> None:
    """Megatron's checks of the profiling window."""
    if not cfg.profile:
        return
    if cfg.profile_step_start < 0 or cfg.profile_step_end <= cfg.profile_step_start:
        fail(
            f"--profile-step-start {cfg.profile_step_start} and --profile-step-end {cfg.profile_step_end}: "
            "the end must come after the start, and the start must be >= 0"
        )
    if cfg.use_pytorch_profiler and cfg.tensorboard_dir is None:
        fail("--use-pytorch-profiler writes its trace next to --tensorboard-dir; give --tensorboard-dir")
