"""--rampup-batch-size and --decrease-batch-size-if-needed: Megatron's micro-batch calculators, the iteration
count, and a training run (consumed samples, learning rate, resume) following the ramp-up."""

import math

import pytest
from helpers import ONE_LAYER_RUN, tiny_flags
from megatron_core_reference import megatron_core_reference
from megatron_log import MEGATRON_LINE

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.training.microbatches import (
    ConstantNumMicroBatchesCalculator,
    RampupBatchsizeNumMicroBatchesCalculator,
    rampup_train_iters,
)
from megatron_lite.training.training import pretrain


def megatron_batch(consumed: int, start: int, increment: int, samples: int, gbs: int) -> int:
    """Megatron's RampupBatchsizeNumMicroBatchesCalculator.update, written out."""
    if consumed > samples:
        return gbs
    per_increment = samples / ((gbs - start) // increment)
    return start + int(consumed / per_increment) * increment


def megatron_train_iters(train_samples: int, start: int, increment: int, samples: int, gbs: int) -> int:
    """Megatron's (core_v0.15) update_train_iters with a ramp-up, written out."""
    iterations = consumed = 0
    while consumed <= samples and consumed <= train_samples:
        consumed += megatron_batch(consumed, start, increment, samples, gbs)
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // gbs
    return iterations


def test_rampup_batch_sizes_follow_megatron_formula():
    calc = RampupBatchsizeNumMicroBatchesCalculator(96, 2, 4, False, 16, 16, 1000)
    consumed, seen = 0, []
    while consumed < 3000:
        calc.update(consumed)
        batch = calc.get_current_global_batch_size()
        assert batch == megatron_batch(consumed, 16, 16, 1000, 96)
        assert calc.get() == batch // 8 and calc.get_current_running_global_batch_size() == batch
        seen.append(batch)
        consumed += batch
    # 5 increments of 16, each after 200 samples: 16 x 13 steps (208 samples), 32 x 7, ..., then 96.
    assert sorted(set(seen)) == [16, 32, 48, 64, 80, 96]
    assert seen[:14] == [16] * 13 + [32]
    assert rampup_train_iters(calc, 5000) == megatron_train_iters(5000, 16, 16, 1000, 96)


# (start, increment, ramp-up samples, global batch, micro batch, DP, decrease-if-needed)
CORE_RAMPS = [
    (4, 4, 100, 32, 1, 2, False),
    (8, 8, 997, 64, 1, 4, False),
    (2, 2, 1, 6, 1, 1, False),
    (16, 16, 1000, 96, 2, 4, False),
    (6, 6, 30, 24, 2, 2, True),  # 6 and 18 round down to 4 and 16
    (7, 6, 77, 43, 2, 3, True),
]


def core_consumed(ramp) -> list[int]:
    """Every third sample count to twice the ramp-up, and the counts a run reaches (its running batches)."""
    start, increment, samples, gbs, mbs, dp, decrease = ramp
    ours = RampupBatchsizeNumMicroBatchesCalculator(gbs, mbs, dp, decrease, start, increment, samples)
    run, consumed = [], 0
    while consumed <= samples + gbs:
        run.append(consumed)
        ours.update(consumed, consistency_check=False)
        consumed += ours.get_current_running_global_batch_size()
    return sorted(set(range(0, 2 * samples + 50, 3)) | set(run))


TRAIN_SAMPLES = [0, 1, 50, 100, 101, 999, 5000]


@pytest.fixture(scope="module")
def core_ramps() -> dict:
    requests = {
        str(i): {
            "kind": "rampup",
            "args": [gbs, mbs, dp, decrease, 0, start, increment, samples],
            "consumed": core_consumed(ramp),
            "train_samples": TRAIN_SAMPLES,
        }
        for i, ramp in enumerate(CORE_RAMPS)
        for start, increment, samples, gbs, mbs, dp, decrease in [ramp]
    }
    return megatron_core_reference(requests)


@pytest.mark.parametrize("index", range(len(CORE_RAMPS)))
def test_rampup_equals_megatron_cores_calculator(index, core_ramps):
    start, increment, samples, gbs, mbs, dp, decrease = CORE_RAMPS[index]
    ours = RampupBatchsizeNumMicroBatchesCalculator(gbs, mbs, dp, decrease, start, increment, samples)
    got = []
    for consumed in core_consumed(CORE_RAMPS[index]):
        ours.update(consumed, consistency_check=False)
        got.append(
            [ours.get(), ours.get_current_global_batch_size(), ours.get_current_running_global_batch_size()]
        )
    reference = core_ramps[str(index)]
    assert got == reference["batches"]
    sizes = {batch for _, batch, _ in got}
    assert (min(sizes), max(sizes)) == (start, gbs) and len(sizes) > 2 - (samples < 2)  # it ramps up
    if decrease:
        assert any(running < batch for _, batch, running in got)
    iters = []
    for train_samples in TRAIN_SAMPLES:
        fresh = RampupBatchsizeNumMicroBatchesCalculator(gbs, mbs, dp, decrease, start, increment, samples)
        iters.append(rampup_train_iters(fresh, train_samples))
    assert iters == reference["train_iters"]


def test_decrease_batch_size_if_needed_rounds_the_running_batch_down():
    calc = ConstantNumMicroBatchesCalculator(10, 2, 4, decrease_batch_size_if_needed=True)
    assert (
        calc.get(),
        calc.get_current_global_batch_size(),
        calc.get_current_running_global_batch_size(),
    ) == (
        1,
        10,
        8,
    )
    ramp = RampupBatchsizeNumMicroBatchesCalculator(24, 2, 2, True, 6, 6, 30)
    ramp.update(0)
    assert (
        ramp.get_current_global_batch_size(),
        ramp.get_current_running_global_batch_size(),
        ramp.get(),
    ) == (
        6,
        4,
        1,
    )
    with pytest.raises(UserError, match="not divisible by --micro-batch-size 2 x data-parallel size 4"):
        ConstantNumMicroBatchesCalculator(10, 2, 4)


# ---- a training run ---------------------------------------------------------------------------------
RAMP = dict(
    **ONE_LAYER_RUN,
    micro_batch_size=2,
    global_batch_size=8,
    train_samples=64,
    rampup_batch_size="2 2 24",
    lr_warmup_samples=8,
    lr_decay_style="cosine",
    min_lr=1e-4,
    eval_iters=0,
    log_interval=1,
    hidden_dropout=0,
    attention_dropout=0,
)


def ramp_config(**extra):
    flags = tiny_flags(**{**RAMP, **extra})
    return parse_config(" ".join(flags).split())


def megatron_lr(samples: int) -> float:
    """The cosine schedule after `samples` consumed samples (warmup 8 samples, decay over --train-samples 64)."""
    if samples <= 8:
        return 1e-3 * samples / 8
    return 1e-4 + 0.5 * (math.cos(math.pi * (samples - 8) / (64 - 8)) + 1.0) * (1e-3 - 1e-4)


def test_training_follows_the_ramp_up_and_resumes_it(tmp_path):
    cfg = ramp_config().finalize(1, 64)
    # 4 iterations of 2, 2 of 4, 2 of 6 (to 28 samples), then (64 - 28) // 8 = 4 of 8.
    assert cfg.train_iters == megatron_train_iters(64, 2, 2, 24, 8) == 12
    straight = pretrain(ramp_config())
    fields = [MEGATRON_LINE.match(line).groupdict() for line in straight.log_lines]
    consumed = [int(f["consumed"]) for f in fields]
    expected, total = [], 0
    for _ in range(12):
        total += megatron_batch(total, 2, 2, 24, 8)
        expected.append(total)
    assert consumed == expected == [2, 4, 6, 8, 12, 16, 22, 28, 36, 44, 52, 60]
    # The schedule steps by each iteration's own batch: the logged lr is the one for the samples so far.
    assert [float(f["lr"]) for f in fields] == pytest.approx([megatron_lr(c) for c in consumed], rel=1e-6)
    assert straight.consumed_train_samples == 60

    ckpt = str(tmp_path / "ckpt")
    first = pretrain(ramp_config(save=ckpt, save_interval=100, exit_interval=5))
    assert (first.iteration, first.consumed_train_samples) == (5, 12)
    resumed = pretrain(ramp_config(save=ckpt, save_interval=100, load=ckpt))
    resumed_consumed = [int(MEGATRON_LINE.match(line)["consumed"]) for line in resumed.log_lines]
    assert resumed_consumed == expected[5:]
    assert first.losses + resumed.losses == straight.losses


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (
            dict(train_samples=None, train_iters=10),
            1,
            "--rampup-batch-size needs --train-samples (it counts samples), not --train-iters",
        ),
        (
            dict(rampup_batch_size="8 2 24"),
            1,
            "--rampup-batch-size start batch 8 must be smaller than --global-batch-size 8",
        ),
        (
            dict(rampup_batch_size="2 4 24"),
            1,
            "--rampup-batch-size: --global-batch-size 8 minus the start batch 2 is not a multiple of the increment 4",
        ),
        (
            dict(rampup_batch_size="0 2 24"),
            1,
            "the start batch, the increment and the ramp-up samples must be positive",
        ),
        (dict(rampup_batch_size="2 2 0"), 1, "--rampup-batch-size 2 2 0: the start batch, the increment and"),
        (
            dict(rampup_batch_size="2 2 24"),
            2,
            "--rampup-batch-size: the global batch 2 at 0 consumed samples is smaller than --micro-batch-size 2 x "
            "data-parallel size 2",
        ),
        (
            dict(rampup_batch_size="4 2 24"),
            2,
            "--rampup-batch-size reaches a global batch of 6 at 12 consumed samples, which is not divisible by "
            "--micro-batch-size 2 x data-parallel size 2 (or give --decrease-batch-size-if-needed)",
        ),
    ],
)
def test_bad_ramp_ups_are_one_line_naming_the_flag(extra, world, message):
    with pytest.raises(UserError) as err:
        ramp_config(**extra).finalize(world, 64)
    assert message in str(err.value)


def test_decreased_batch_ramp_up_counts_iterations_with_the_unrounded_batch():
    # Megatron's update_train_iters adds the unrounded batch even when the running batch is rounded down.
    cfg = ramp_config(rampup_batch_size="4 2 24", decrease_batch_size_if_needed=True).finalize(2, 64)
    assert cfg.train_iters == megatron_train_iters(64, 4, 2, 24, 8)
