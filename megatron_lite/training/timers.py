"""Megatron's timers: named clocks gated by --timing-log-level, reported over ranks in Megatron's format."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

# The timers Megatron's training_log reports after the log line, by the level that enables them. Names
# megatron-lite never starts (pipeline sends and receives, for example) are simply absent from the output.
TIMERS_LEVEL_1 = (
    "forward-backward",
    "layernorm-grads-all-reduce",
    "embedding-grads-all-reduce",
    "all-grads-sync",
    "params-all-gather",
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "optimizer",
)
TIMERS_LEVEL_2 = (
    "batch-generator",
    "forward-compute",
    "backward-compute",
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-forward-recv",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
)
MAX_LOG_LEVEL = 2
LOG_OPTIONS = ("max", "minmax", "all")


def timers_to_log(timing_log_level: int) -> list[str]:
    """The timers training_log reports at this --timing-log-level (none at 0)."""
    names: list[str] = []
    if timing_log_level >= 1:
        names.extend(TIMERS_LEVEL_1)
    if timing_log_level >= 2:
        names.extend(TIMERS_LEVEL_2)
    return names


class DummyTimer:
    """What a timer above --timing-log-level is: starting and stopping it costs nothing."""

    name = "dummy timer"

    def start(self, barrier: bool | None = None) -> None:
        return

    def stop(self, barrier: bool = False) -> None:
        return

    def reset(self) -> None:
        return

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        raise RuntimeError("a timer above --timing-log-level measures nothing; check its log_level")


class Timer:
    """A start/stop clock that accumulates seconds until read with reset."""

    def __init__(self, name: str, device: torch.device, *, default_barrier: bool = False) -> None:
        self.name = name
        self._device = device
        # Level-1 timers start with a barrier (--no-barrier-with-level-1-timing turns it off), as Megatron's.
        self._default_barrier = default_barrier
        self._elapsed = 0.0
        self._active_time = 0.0
        self._started = False
        self._start_time = 0.0

    def _sync(self, barrier: bool) -> None:
        if barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # kernels are asynchronous: time their completion

    def start(self, barrier: bool | None = None) -> None:
        if self._started:
            raise RuntimeError(f"timer {self.name} has already been started")
        self._sync(self._default_barrier if barrier is None else barrier)
        self._start_time = time.perf_counter()
        self._started = True

    def stop(self, barrier: bool = False) -> None:
        if not self._started:
            raise RuntimeError(f"timer {self.name} is not started")
        self._sync(barrier)
        elapsed = time.perf_counter() - self._start_time
        self._elapsed += elapsed
        self._active_time += elapsed
        self._started = False

    def reset(self) -> None:
        self._elapsed = 0.0
        self._started = False

    def set_elapsed(self, value: float) -> None:
        """Put a measured duration in (Megatron's way of reporting start-up times; used by tests)."""
        self._elapsed = value

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Seconds accumulated so far (a running timer is read without stopping it)."""
        running = self._started
        if running:
            self.stop(barrier=barrier)
        elapsed = self._elapsed
        if reset:
            self.reset()
        if running:
            self.start(barrier=barrier)
        return elapsed

    def active_time(self) -> float:
        """All the time this timer ran, resets included."""
        return self._active_time


class Timers:
    """A group of timers. `timers(name, log_level)` gives the timer, or a DummyTimer above the level.

    The report methods are collectives over all ranks (every rank must call them with the same names).
    """

    def __init__(
        self,
        log_level: int,
        log_option: str,
        *,
        device: torch.device | None = None,
        barrier_with_L1_time: bool = True,
        print_fn: Callable[[str], None] | None = None,
    ) -> None:
        if log_option not in LOG_OPTIONS:
            raise ValueError(f"timing log option {log_option!r} is not one of {', '.join(LOG_OPTIONS)}")
        self._log_level = log_level
        self._log_option = log_option
        self._device = device or torch.device("cpu")
        self._barrier_with_L1_time = barrier_with_L1_time
        self._print = print_fn or (lambda text: print(text, flush=True))
        self._timers: dict[str, Timer] = {}
        self._log_levels: dict[str, int] = {}
        self._dummy = DummyTimer()

    def __call__(self, name: str, log_level: int | None = None) -> Timer | DummyTimer:
        if name in self._timers:
            if log_level is not None and log_level != self._log_levels[name]:
                raise ValueError(
                    f"timer {name} was created with log level {self._log_levels[name]}, not {log_level}"
                )
            return self._timers[name]
        if log_level is None:
            log_level = MAX_LOG_LEVEL
        if log_level > MAX_LOG_LEVEL:
            raise ValueError(f"log level {log_level} is above the largest, {MAX_LOG_LEVEL}")
        if log_level > self._log_level:
            return self._dummy
        timer = Timer(name, self._device, default_barrier=log_level == 1 and self._barrier_with_L1_time)
        self._timers[name] = timer
        self._log_levels[name] = log_level
        return timer

    # ---- gathering over ranks ------------------------------------------------------------------------
    def _elapsed_all_ranks(self, names: list[str], reset: bool, barrier: bool) -> list[list[float]] | None:
        """[rank][name] seconds; timers a rank does not have count 0 there."""
        if not names:
            return None
        distributed = dist.is_available() and dist.is_initialized()
        if barrier and distributed:
            dist.barrier()
        world = dist.get_world_size() if distributed else 1
        own = [self._timers[name].elapsed(reset=reset) if name in self._timers else 0.0 for name in names]
        if world == 1:
            return [own]
        # gloo gathers CPU tensors; NCCL needs them on this rank's GPU.
        mine = torch.tensor(own, dtype=torch.float64, device=self._device)
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine)
        return [row.tolist() for row in rows]

    def _min_max(
        self, names: list[str], reset: bool, barrier: bool, normalizer: float
    ) -> dict[str, tuple[float, float]]:
        """(min, max) / normalizer over the ranks where the timer ran, for the timers that ran anywhere."""
        table = self._elapsed_all_ranks(names, reset, barrier)
        result = {}
        for i, name in enumerate(names):
            ran = [row[i] for row in table if row[i] > 0.0] if table else []
            if ran:
                result[name] = (min(ran) / normalizer, max(ran) / normalizer)
        return result

    def _min_max_string(
        self, names: list[str], reset: bool, barrier: bool, normalizer: float, max_only: bool
    ) -> str | None:
        stats = self._min_max(names, reset, barrier, normalizer)
        if not stats:
            return None
        text = "max time across ranks (ms):" if max_only else "(min, max) time across ranks (ms):"
        for name, (low, high) in stats.items():
            label = (name + " ").ljust(48, ".")
            text += f"\n    {label}: {high:.2f}" if max_only else f"\n    {label}: ({low:.2f}, {high:.2f})"
        return text

    def _all_ranks_string(
        self, names: list[str], reset: bool, barrier: bool, normalizer: float
    ) -> str | None:
        table = self._elapsed_all_ranks(names, reset, barrier)
        text = "times across ranks (ms):"
        reported = False
        for i, name in enumerate(names):
            first = True
            for rank, row in enumerate(table or []):
                if row[i] > 0:
                    reported = True
                    if first:
                        first = False
                        text += f"\n  {name}:"
                    text += f"\n     rank {rank:2d}: {row[i] / normalizer:.2f}"
        return text if reported else None

    # ---- reports -------------------------------------------------------------------------------------
    def get_all_timers_string(
        self,
        names: Iterable[str] | None = None,
        normalizer: float = 1.0,
        reset: bool = True,
        barrier: bool = False,
    ) -> str | None:
        """Megatron's report of `names` (default: every timer) in ms divided by `normalizer`."""
        names = list(self._timers) if names is None else list(names)
        if normalizer <= 0.0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
        per_ms = normalizer / 1000.0
        if self._log_option == "all":
            return self._all_ranks_string(names, reset, barrier, per_ms)
        return self._min_max_string(names, reset, barrier, per_ms, max_only=self._log_option == "max")

    def log(
        self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True, barrier: bool = False
    ) -> str | None:
        """Print the report of `names` (through print_fn, which prints on the logging rank) and return it."""
        text = self.get_all_timers_string(names, normalizer, reset, barrier)
        if text is not None:
            self._print(text)
        return text

    def max_times(
        self, names: Iterable[str], normalizer: float = 1.0, reset: bool = False, barrier: bool = False
    ) -> dict[str, float]:
        """`{name}-time`: the largest time over ranks in seconds / normalizer, what Megatron's
        timers.write sends to TensorBoard and wandb."""
        if normalizer <= 0.0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
        stats = self._min_max(list(names), reset, barrier, normalizer)
        return {f"{name}-time": high for name, (_, high) in stats.items()}
