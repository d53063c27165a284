"""Megatron's number-of-micro-batches calculators: a constant global batch, one ramped up over samples
(--rampup-batch-size), or a step-wise schedule (--step-batch-size-schedule)."""

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


STEP_FLAG = "--step-batch-size-schedule"
_SUFFIXES = {"T": 10**12, "B": 10**9, "M": 10**6, "K": 10**3}


def _schedule_number(text: str, entry: str) -> int:
    """A threshold or batch size as Megatron reads it: a float with an optional K/M/B/T suffix (any case),
    multiplied out and truncated to an int ("2.4B" is 2400000000)."""
    value = text.strip().upper()
    multiplier = 1
    if value[-1:] in _SUFFIXES:
        multiplier = _SUFFIXES[value[-1]]
        value = value[:-1]
    try:
        return int(float(value) * multiplier)
    except (ValueError, OverflowError):
        fail(f"{STEP_FLAG}: {text!r} in entry {entry!r} is not a number (optionally with K, M, B or T)")


def parse_step_batch_size_schedule(schedule: str, seq_length: int | None) -> list[tuple[int, int]]:
    """Megatron's "THRESHOLD:BATCHSIZE ..." (spaces or commas between entries) as (threshold in samples,
    global batch) pairs sorted by threshold. With a sequence length the thresholds are tokens, floored to
    whole samples (Megatron's training always passes --seq-length). Checked as Megatron checks it: at
    least one entry, the first at 0 samples, thresholds strictly increasing, batch sizes positive."""
    entries = []
    for entry in schedule.strip().replace(",", " ").split():
        if ":" not in entry:
            fail(f'{STEP_FLAG}: entry "{entry}" is not THRESHOLD:BATCH_SIZE')
        threshold_text, batch_text = entry.split(":", 1)
        threshold = _schedule_number(threshold_text, entry)
        if seq_length is not None:
            threshold //= seq_length
        entries.append((threshold, _schedule_number(batch_text, entry)))
    entries.sort(key=lambda pair: pair[0])
    if not entries:
        fail(f"{STEP_FLAG}: the schedule must have at least one THRESHOLD:BATCH_SIZE entry")
    unit = f" (tokens / --seq-length {seq_length})" if seq_length is not None else ""
    if entries[0][0] != 0:
        fail(f"{STEP_FLAG}: the first threshold must be 0, got {entries[0][0]} samples{unit}")
    for (before, _), (after, _) in zip(entries, entries[1:]):
        if after <= before:
            fail(
                f"{STEP_FLAG}: thresholds must be strictly increasing, got {before} samples before "
                f"{after} samples{unit}"
            )
    for _, batch in entries:
        if batch <= 0:
            fail(f"{STEP_FLAG}: batch sizes must be positive, got {batch}")
    return entries


class StepBatchsizeNumMicroBatchesCalculator(ConstantNumMicroBatchesCalculator):
    """--step-batch-size-schedule: the global batch is the batch of the last schedule entry whose
    threshold (in samples) the consumed samples have reached.

    As in Megatron only the batch a step actually uses must divide into micro batch x data-parallel
    (checked when it is reached), so a run resumed on more ranks may have early entries too small for
    them. --decrease-batch-size-if-needed is refused.
    """

    def __init__(
        self,
        micro_batch_size: int,
        data_parallel_size: int,
        schedule: str,
        seq_length: int | None = None,
    ) -> None:
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.decrease_batch_size_if_needed = False
        self.per_step = micro_batch_size * data_parallel_size
        self.schedule = parse_step_batch_size_schedule(schedule, seq_length)
        self.global_batch_size = self.schedule[-1][1]
        self.update(0, consistency_check=False)

    def batch_size_at(self, consumed_samples: int) -> int:
        """The global batch after `consumed_samples` samples."""
        batch = self.schedule[0][1]
        for threshold, size in self.schedule:
            if consumed_samples < threshold:
                break
            batch = size
        return batch

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        """Set the batch for the next step from the samples consumed so far."""
        current = self.batch_size_at(consumed_samples)
        if consistency_check and current % self.per_step != 0:
            fail(
                f"{STEP_FLAG}: the global batch {current} at {consumed_samples} consumed samples is not "
                f"divisible by --micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel_size}"
            )
        self.current_global_batch_size = current
        self.current_running_global_batch_size = current
        self.num_micro_batches = current // self.per_step

    def steps(self, consumed_samples: int, iterations: int) -> list[tuple[int, int, int]]:
        """(consumed samples at its start, batch, iterations) for each run of equal batches that
        `iterations` steps from `consumed_samples` on go through."""
        runs = []
        thresholds = [t for t, _ in self.schedule]
        while iterations > 0:
            batch = self.batch_size_at(consumed_samples)
            ahead = [t for t in thresholds if t > consumed_samples]
            count = iterations if not ahead else min(iterations, -(-(ahead[0] - consumed_samples) // batch))
            runs.append((consumed_samples, batch, count))
            consumed_samples += count * batch
            iterations -= count
        return runs


def step_schedule_train_iters(calculator: StepBatchsizeNumMicroBatchesCalculator, train_samples: int) -> int:
    """Megatron's (main) iteration count for --train-samples with a step schedule: steps until the consumed
    samples reach --train-samples, the last one whole even if it passes them."""
    iterations = consumed = 0
    thresholds = [t for t, _ in calculator.schedule] + [train_samples]
    while consumed < train_samples:
        batch = calculator.batch_size_at(consumed)
        end = min(t for t in thresholds if t > consumed)
        count = -(-(end - consumed) // batch)
        iterations += count
        consumed += count * batch
    return iterations


def step_schedule_notices(calculator: StepBatchsizeNumMicroBatchesCalculator, train_iters: int) -> list[str]:
    """Warnings for the batches a fresh run reaches that do not split into micro batch x data-parallel:
    Megatron stops with an error when it gets there (a resumed run on other ranks may not)."""
    notices = []
    for consumed, batch, _ in calculator.steps(0, train_iters):
        if batch % calculator.per_step != 0:
            notices.append(
                f"{STEP_FLAG}: the global batch {batch} from {consumed} consumed samples is not divisible by "
                f"--micro-batch-size {calculator.micro_batch_size} x data-parallel size "
                f"{calculator.data_parallel_size}; training stops there with an error (as in Megatron)"
            )
    return notices


def train_num_samples(cfg: Any) -> int:
    """Training samples to build the dataset for: --train-iters x --global-batch-size (the final batch of a
    ramp-up); with a step schedule at least what its steps consume (Megatron's --global-batch-size is then
    micro batch x DP)."""
    samples = cfg.train_iters * cfg.global_batch_size
    if cfg.step_batch_size_schedule is None:
        return samples
    calculator = build_num_microbatches_calculator(cfg)
    needed = sum(batch * count for _, batch, count in calculator.steps(0, cfg.train_iters))
    return max(samples, cfg.train_samples or 0, needed)


def build_num_microbatches_calculator(cfg: Any) -> ConstantNumMicroBatchesCalculator:
    """The calculator a finalized config asks for: a step schedule (which, as in Megatron-LM main, makes
    --rampup-batch-size ignored), a ramp-up, or a constant batch. Thresholds of a step schedule count
    tokens (Megatron's training passes --seq-length)."""
    if cfg.step_batch_size_schedule is not None:
        return StepBatchsizeNumMicroBatchesCalculator(
            cfg.micro_batch_size, cfg.data_parallel_size, cfg.step_batch_size_schedule, cfg.seq_length
        )
    if cfg.rampup_batch_size is None:
        return ConstantNumMicroBatchesCalculator(
            cfg.global_batch_size,
            cfg.micro_batch_size,
            cfg.data_parallel_size,
            cfg.decrease_batch_size_if_needed,
        )
    if len(cfg.rampup_batch_size) != 3:  # a YAML list can have any length; the flag takes exactly three
        fail(
            "--rampup-batch-size takes three numbers (start batch, increment, ramp-up samples), "
            f"got {' '.join(map(str, cfg.rampup_batch_size)) or 'none'}"
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
