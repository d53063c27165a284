"""Megatron's --profile window: torch.profiler (--use-pytorch-profiler) or a CUDA profiler range for nsys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_lite.config import MegatronConfig


class Profiler:
    """Starts and stops profiling at Megatron's iterations; call `step(iteration)` before each iteration runs.

    As Megatron: torch.profiler's schedule waits until --profile-step-start, records until --profile-step-end
    and writes a Chrome trace per rank to `<tensorboard-dir>/../torch_profile/rank-R.json.gz`. Without
    --use-pytorch-profiler the window is a cudaProfilerStart/Stop range for `nsys --capture-range=cudaProfilerApi`
    (CUDA only: on a CPU there is nothing to capture, and start-up says so).
    """

    def __init__(self, cfg: MegatronConfig, rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.rank = rank
        self.enabled = cfg.profile and (not cfg.profile_ranks or rank in cfg.profile_ranks)
        self.cuda_range = self.enabled and not cfg.use_pytorch_profiler and device.type == "cuda"
        self.torch_profiler: Any = None
        self.trace_path: Path | None = None
        if self.enabled and cfg.use_pytorch_profiler:
            self.trace_path = Path(cfg.tensorboard_dir).parent / "torch_profile" / f"rank-{rank}.json.gz"
            start = cfg.profile_step_start
            self.torch_profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(
                    wait=max(start - 1, 0),
                    warmup=1 if start > 0 else 0,
                    active=cfg.profile_step_end - start,
                    repeat=1,
                ),
                on_trace_ready=self._write_trace,
                record_shapes=cfg.pytorch_profiler_collect_shapes,
                with_stack=cfg.pytorch_profiler_collect_callstack,
            )
            self.torch_profiler.start()

    def notice(self) -> str | None:
        """One start-up line when --profile cannot capture anything on this device."""
        if self.cfg.profile and not self.cfg.use_pytorch_profiler and not self.cuda_range and self.enabled:
            return (
                "--profile without --use-pytorch-profiler marks an nsys range on CUDA; no effect on this CPU"
            )
        return None

    def _write_trace(self, prof: Any) -> None:
        assert self.trace_path is not None
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))

    def step(self, iteration: int) -> None:
        """Called at the top of every training iteration with the number of iterations done so far."""
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        elif self.cuda_range and iteration == self.cfg.profile_step_start:
            torch.cuda.cudart().cudaProfilerStart()

    def after(self, iteration: int) -> None:
        """Called after each iteration: the window closes at --profile-step-end."""
        if not self.enabled or iteration != self.cfg.profile_step_end:
            return
        if self.torch_profiler is not None:
            self.torch_profiler.stop()
            self.torch_profiler = None
        elif self.cuda_range:
            torch.cuda.cudart().cudaProfilerStop()

    def close(self) -> None:
        """Stop a window the run ended inside (the trace then holds what was recorded)."""
        if self.torch_profiler is not None:
            self.torch_profiler.stop()
            self.torch_profiler = None
