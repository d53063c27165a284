"""Megatron's number-of-micro-batches calculators: a constant global batch, or one ramped up over samples."""

from __future__ import annotations

from typing import Any

from megatron_lite.errors import fail


def _round(batch_size: int, divisor: int) -> int:
    """`batch_size` rounded down to a multiple of `divisor`."""
    return (batch_size // divisor) * divisor


class ConstantNumMicroBatchesCalculator:
    """A fixed global batch: global / (micro x data-parallel) micro batches per step on every DP rank.

    With --decrease-batch-size-if-needed the batch actually run ("running") is the global batch rounded
    down to a multiple of micro x data-parallel, as in Megatron.
    """

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        decrease_batch_size_if_needed: bool = False,
    ) -> None:
        per_step = micro_batch_size * data_parallel_size
        self.micro_batch_size = micro_batch_size
        self.decrease_batch_size_if_needed = decrease_batch_size_if_needed
        if decrease_batch_size_if_needed:
            running = _round(global_batch_size, per_step)
        elif global_batch_size % per_step != 0:
            fail(
                f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        else:
            running = global_batch_size
        if running // per_step < 1:
            fail(
                f"--global-batch-size {global_batch_size} is smaller than --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        self.current_global_batch_size = global_batch_size
        self.current_running_global_batch_size = running
        self.num_micro_batches = running // per_step

    def get(self) -> int:
        """Micro batches per optimizer step on each DP rank."""
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    def get_current_running_global_batch_size(self) -> int:
        """The batch one step really trains on (smaller than the global batch only when decreased)."""
        return self.current_running_global_batch_size

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        """Nothing changes with a constant batch."""


class RampupBatchsizeNumMicroBatchesCalculator(ConstantNumMicroBatchesCalculator):
    """--rampup-batch-size START INCREMENT SAMPLES: the global batch starts at START and grows by INCREMENT
    every SAMPLES / ((global - START) / INCREMENT) consumed samples; past SAMPLES it is the global batch.

    The batch after `consumed` samples is START + int(consumed / samples_per_increment) * INCREMENT,
    Megatron's formula (float division, truncated).
    """

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        decrease_batch_size_if_needed: bool,
        start_global_batch_size: int,
        batch_size_increment: int,
        rampup_samples: int,
    ) -> None:
        flag = "--rampup-batch-size"
        # Megatron asserts ramp-up samples >= 0 but then divides by 0 samples per increment: 0 is refused here.
        if min(start_global_batch_size, batch_size_increment, rampup_samples) <= 0:
            fail(
                f"{flag} {start_global_batch_size} {batch_size_increment} {rampup_samples}: the start batch, "
                "the increment and the ramp-up samples must be positive"
            )
        diff = global_batch_size - start_global_batch_size
        if diff <= 0:
            fail(
                f"{flag} start batch {start_global_batch_size} must be smaller than --global-batch-size "
                f"{global_batch_size}"
            )
        if diff % batch_size_increment != 0:
            fail(
                f"{flag}: --global-batch-size {global_batch_size} minus the start batch {start_global_batch_size} "
                f"is not a multiple of the increment {batch_size_increment}"
            )
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.decrease_batch_size_if_needed = decrease_batch_size_if_needed
        self.start_global_batch_size = start_global_batch_size
        self.batch_size_increment = batch_size_increment
        self.rampup_samples = rampup_samples
        self.per_step = micro_batch_size * data_parallel_size
        self.rampup_samples_per_increment = rampup_samples / (diff // batch_size_increment)
        self.update(0, consistency_check=False)

    def batch_size_at(self, consumed_samples: int) -> int:
        """The global batch Megatron trains on after `consumed_samples` samples."""
        if consumed_samples > self.rampup_samples:
            return self.global_batch_size
        steps = int(consumed_samples / self.rampup_samples_per_increment)
        return self.start_global_batch_size + steps * self.batch_size_increment

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        """Set the batch for the next step from the samples consumed so far."""
        current = self.batch_size_at(consumed_samples)
        self.current_global_batch_size = current
        if current % self.per_step == 0:
            running = current
        elif self.decrease_batch_size_if_needed:
            running = _round(current, self.per_step)
        else:
            running = current
            if consistency_check:
                fail(
                    f"--rampup-batch-size reaches a global batch of {current} at {consumed_samples} consumed "
                    f"samples, which is not divisible by --micro-batch-size {self.micro_batch_size} x "
                    f"data-parallel size {self.data_parallel_size} (or give --decrease-batch-size-if-needed)"
                )
        if running < self.per_step:
            fail(
                f"--rampup-batch-size: the global batch {current} at {consumed_samples} consumed samples is "
                f"smaller than --micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel_size}"
            )
        self.current_running_global_batch_size = running
        self.num_micro_batches = running // self.per_step


def build_num_microbatches_calculator(cfg: Any) -> ConstantNumMicroBatchesCalculator:
    """The calculator a finalized config asks for (constant, or ramped up with --rampup-batch-size)."""
    if cfg.rampup_batch_size is None:
        return ConstantNumMicroBatchesCalculator(
            cfg.global_batch_size,
            cfg.micro_batch_size,
            cfg.data_parallel_size,
            cfg.decrease_batch_size_if_needed,
        )
    start, increment, samples = (int(v) for v in cfg.rampup_batch_size)
    return RampupBatchsizeNumMicroBatchesCalculator(
        cfg.global_batch_size,
        cfg.micro_batch_size,
        cfg.data_parallel_size,
        cfg.decrease_batch_size_if_needed,
        start,
        increment,
        samples,
    )


def rampup_train_iters(calculator: RampupBatchsizeNumMicroBatchesCalculator, train_samples: int) -> int:
    """Megatron's (core_v0.15) iteration count for --train-samples with a batch ramp-up.

    Ramp-up phase: one iteration per batch while the consumed samples are at most the ramp-up samples
    and the train samples, each consuming the (unrounded) current global batch; then whole global
    batches until --train-samples (a partial last batch is dropped). Every batch size the ramp-up visits
    is checked for divisibility here, so a bad combination fails before training starts.
    """
    iterations = consumed = 0
    while consumed <= calculator.rampup_samples and consumed <= train_samples:
        calculator.update(consumed, consistency_check=True)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    calculator.update(calculator.rampup_samples + 1, consistency_check=True)  # the full batch, after it
    calculator.update(0, consistency_check=False)
    if train_samples > consumed:
        iterations += (train_samples - consumed) // calculator.global_batch_size
    return iterations
