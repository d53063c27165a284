"""--step-batch-size-schedule (Megatron-LM main): parsing, the batch after each consumed-sample count, the
iteration count, its errors and its interplay with the other batch flags, and a training run that follows it."""

import math

import pytest
import torch
from helpers import ONE_LAYER_RUN, tiny_flags
from megatron_log import MEGATRON_LINE

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.microbatches import (
    StepBatchsizeNumMicroBatchesCalculator,
    parse_step_batch_size_schedule,
    step_schedule_train_iters,
    train_num_samples,
)
from megatron_lite.training.training import pretrain


def megatron_train_iters(calc: StepBatchsizeNumMicroBatchesCalculator, train_samples: int) -> int:
    """Megatron-LM main's update_train_iters with a step schedule, written out: one step at a time."""
    iterations = consumed = 0
    while consumed < train_samples:
        calc.update(consumed, consistency_check=False)
        consumed += calc.get_current_global_batch_size()
        iterations += 1
    calc.update(0, consistency_check=False)
    return iterations


@pytest.mark.parametrize(
    "schedule, seq_length, expected",
    [
        # Megatron's example: token thresholds floored to samples of 2048 tokens.
        (
            "0:768 250B:1536 500B:3072 750B:6144",
            2048,
            [(0, 768), (122070312, 1536), (244140625, 3072), (366210937, 6144)],
        ),
        ("0:16 2.4B:320 4.8b:624", None, [(0, 16), (2_400_000_000, 320), (4_800_000_000, 624)]),
        # commas separate like spaces, suffixes apply to batch sizes too, entries are sorted by threshold
        ("1.5K:2k,0:1K 3m:8 1T:9", None, [(0, 1000), (1500, 2000), (3_000_000, 8), (10**12, 9)]),
        ("0:4 100:8", 8, [(0, 4), (12, 8)]),
    ],
)
def test_schedule_is_parsed_as_megatron_parses_it(schedule, seq_length, expected):
    assert parse_step_batch_size_schedule(schedule, seq_length) == expected


def test_batch_follows_the_last_threshold_reached():
    calc = StepBatchsizeNumMicroBatchesCalculator(2, 2, "0:4 40:8 96:16", seq_length=4)  # samples 0, 10, 24
    assert calc.global_batch_size == 16
    seen = []
    for consumed in (0, 9, 10, 11, 23, 24, 10**6):
        calc.update(consumed, consistency_check=True)
        seen.append(
            (calc.get_current_global_batch_size(), calc.get(), calc.get_current_running_global_batch_size())
        )
    assert seen == [(4, 1, 4), (4, 1, 4), (8, 2, 8), (8, 2, 8), (8, 2, 8), (16, 4, 16), (16, 4, 16)]


@pytest.mark.parametrize("train_samples", [1, 4, 10, 11, 37, 100, 1003])
def test_train_iters_and_steps_match_a_step_by_step_walk(train_samples):
    calc = StepBatchsizeNumMicroBatchesCalculator(1, 1, "0:4 10:6 30:16")
    assert step_schedule_train_iters(calc, train_samples) == megatron_train_iters(calc, train_samples)
    # steps(): the runs of equal batches, against a walk of 60 steps from 5 consumed samples
    consumed, walk = 5, []
    for _ in range(60):
        walk.append(calc.batch_size_at(consumed))
        consumed += walk[-1]
    runs = calc.steps(5, 60)
    assert [batch for _, batch, count in runs for _ in range(count)] == walk
    assert runs[:2] == [(5, 4, 2), (13, 6, 3)]  # 5, 9 -> 13 reaches 10; 13, 19, 25 -> 31 reaches 30


def test_early_entries_may_be_smaller_than_micro_batch_times_dp():
    # Megatron allows it (a run resumed on more ranks is past them); only a batch actually used is checked.
    calc = StepBatchsizeNumMicroBatchesCalculator(1, 8, "0:4 100:16 200:24")
    calc.update(100, consistency_check=True)
    assert calc.get() == 2
    with pytest.raises(UserError, match=r"the global batch 4 at 0 consumed samples is not divisible by "):
        calc.update(0, consistency_check=True)
    calc.update(250, consistency_check=True)
    assert calc.get() == 3


# ---- through the config -------------------------------------------------------------------------------
RUN = dict(
    **ONE_LAYER_RUN,
    micro_batch_size=2,
    train_samples=52,
    # tokens of 8-token samples: 0, 8 and 20 samples
    step_batch_size_schedule="0:2 64:4 160:8",
    lr_decay_style="cosine",
    lr_warmup_samples=4,
    min_lr=1e-4,
    eval_iters=0,
    log_interval=1,
    hidden_dropout=0,
    attention_dropout=0,
)


def step_config(**extra):
    return parse_config(tiny_flags(**{**RUN, **extra}))


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (dict(step_batch_size_schedule="0-2"), 1, '--step-batch-size-schedule: entry "0-2" is not THRESHOLD:BATCH_SIZE'),
        (dict(step_batch_size_schedule="0:2 1x:4"), 1, "--step-batch-size-schedule: '1x' in entry '1x:4' is not a number"),
        (dict(step_batch_size_schedule=" , "), 1, "the schedule must have at least one THRESHOLD:BATCH_SIZE entry"),
        # 8 tokens is one sample: the first threshold must be 0 samples
        (dict(step_batch_size_schedule="8:2 64:4"), 1, "the first threshold must be 0, got 1 samples (tokens / --seq-length 8)"),
        # 64 and 71 tokens are both 8 samples
        (dict(step_batch_size_schedule="0:2 64:4 71:8"), 1, "thresholds must be strictly increasing, got 8 samples before 8 samples"),
        (dict(step_batch_size_schedule="0:2 64:0"), 1, "--step-batch-size-schedule: batch sizes must be positive, got 0"),
        (dict(global_batch_size=4), 1, "--global-batch-size 4 differs from the last batch size of --step-batch-size-schedule (8)"),
        (dict(decrease_batch_size_if_needed=True), 1, "does not support --decrease-batch-size-if-needed"),
    ],
)  # fmt: skip
def test_schedule_errors_are_one_line_naming_the_flag(extra, world, message):
    with pytest.raises(UserError) as err:
        step_config(**extra).finalize(world, 64)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_global_batch_size_equal_to_the_schedules_last_is_accepted():
    # Megatron-LM's own examples/gpt3 script and gpt_config.yaml give both: the same run as without it.
    given = step_config(global_batch_size=8).finalize(1, 64)
    plain = step_config().finalize(1, 64)
    assert (
        (given.train_iters, given.global_batch_size)
        == (plain.train_iters, plain.global_batch_size)
        == (11, 2)
    )
    assert any(n.startswith("--global-batch-size 8: the last batch size") for n in given.startup_notices)


def test_config_counts_iterations_and_ignores_rampup():
    cfg = step_config(rampup_batch_size=[2, 2, 24]).finalize(1, 64)
    # 4 steps of 2 (to 8 samples), 3 of 4 (to 20), 4 of 8 (to 52), as Megatron's walk counts them
    assert cfg.train_iters == 11
    assert cfg.global_batch_size == 2  # Megatron: micro batch x DP when the schedule sets the batch
    assert "--rampup-batch-size: ignored with --step-batch-size-schedule (as in Megatron-LM main)" in (
        cfg.startup_notices
    )
    assert train_num_samples(cfg) == 52
    # The lr spans count samples with --train-samples
    sched = OptimizerParamScheduler.from_config(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), cfg
    )
    assert (sched.lr_warmup_steps, sched.lr_decay_steps, sched.wd_incr_steps) == (4, 52, 52)


def test_train_iters_counts_spans_in_micro_batch_times_dp_as_megatron():
    # --rampup-batch-size would need --train-samples; next to a schedule Megatron-LM main ignores it.
    cfg = step_config(
        train_samples=None,
        train_iters=6,
        lr_decay_iters=5,
        lr_warmup_samples=None,
        rampup_batch_size=[2, 2, 24],
    )
    cfg.finalize(1, 64)
    sched = OptimizerParamScheduler.from_config(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), cfg
    )
    assert (sched.lr_decay_steps, sched.wd_incr_steps) == (5 * 2, 6 * 2)
    assert any(
        n.startswith("--step-batch-size-schedule with --train-iters: as in Megatron")
        for n in cfg.startup_notices
    )
    # 4 steps of 2, then 2 of 4: the data must hold 16 samples, not train_iters x 2
    assert train_num_samples(cfg) == 16


def test_a_batch_that_does_not_split_stops_training_when_reached():
    cfg = step_config(step_batch_size_schedule="0:2 64:3")
    with pytest.raises(UserError) as err:
        pretrain(cfg)
    assert str(err.value) == (
        "--step-batch-size-schedule: the global batch 3 at 8 consumed samples is not divisible by "
        "--micro-batch-size 2 x data-parallel size 1"
    )
    assert any(
        "the global batch 3 from 8 consumed samples is not divisible" in n for n in cfg.startup_notices
    )


def megatron_lr(samples: int) -> float:
    """Cosine after 4 warmup samples over --train-samples 52, from 1e-3 to 1e-4."""
    if samples <= 4:
        return 1e-3 * samples / 4
    return 1e-4 + 0.5 * (math.cos(math.pi * (samples - 4) / (52 - 4)) + 1.0) * (1e-3 - 1e-4)


def test_training_follows_the_schedule_and_resumes_it(tmp_path):
    straight = pretrain(step_config())
    fields = [MEGATRON_LINE.match(line).groupdict() for line in straight.log_lines]
    consumed = [int(f["consumed"]) for f in fields]
    assert consumed == [2, 4, 6, 8, 12, 16, 20, 28, 36, 44, 52]
    # the scheduler steps by each iteration's own batch
    assert [float(f["lr"]) for f in fields] == pytest.approx([megatron_lr(c) for c in consumed], rel=1e-6)

    ckpt = str(tmp_path / "ckpt")
    first = pretrain(step_config(save=ckpt, save_interval=100, exit_interval=6))
    assert (first.iteration, first.consumed_train_samples) == (6, 16)
    resumed = pretrain(step_config(save=ckpt, save_interval=100, load=ckpt))
    assert [int(MEGATRON_LINE.match(line)["consumed"]) for line in resumed.log_lines] == consumed[6:]
    assert first.losses + resumed.losses == straight.losses
