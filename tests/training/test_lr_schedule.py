"""OptimizerParamScheduler: Megatron's warmup and decay values at chosen iterations, counted in samples."""

import pytest
import torch
from helpers import tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.training.lr_schedule import OptimizerParamScheduler

# Only the schedule's numbers matter here: batch 4, lr 1e-3 (the tiny model's) decaying to 1e-4.
MODEL = dict(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=16)


def scheduler_for(extra: str) -> OptimizerParamScheduler:
    flags = tiny_flags(**MODEL, global_batch_size=4, min_lr=1e-4, train_iters=100) + extra.split()
    cfg = parse_config(flags).finalize(1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return OptimizerParamScheduler.from_config(optimizer, cfg)


def lrs_at(scheduler: OptimizerParamScheduler, iterations: list[int], gbs: int = 4) -> list[float]:
    """Learning rate after each listed iteration (the scheduler moves gbs samples per iteration)."""
    out, done = [], 0
    for it in iterations:
        scheduler.step((it - done) * gbs)
        done = it
        out.append(scheduler.get_lr())
    return out


def test_linear_warmup_then_linear_decay():
    sched = scheduler_for("--lr-warmup-iters 10 --lr-decay-style linear")
    assert sched.lr_warmup_steps == 40 and sched.lr_decay_steps == 400
    assert sched.get_lr() == 0.0
    got = lrs_at(sched, [1, 5, 10, 55, 99, 100, 150])
    # decay from iteration 10 to 100 (90 iterations): halfway at 55; 1/90 of the span left at 99.
    expected = [1e-4, 5e-4, 1e-3, 5.5e-4, 1e-4 + 9e-4 / 90, 1e-4, 1e-4]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_decay_values():
    sched = scheduler_for("--lr-warmup-iters 10 --lr-decay-style cosine")
    got = lrs_at(sched, [10, 40, 55, 70, 100, 101])
    # ratio 1/3 -> coeff 0.75; ratio 1/2 -> 0.5; ratio 2/3 -> 0.25
    expected = [1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4, 1e-4]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_constant_after_warmup_and_warmup_init():
    sched = scheduler_for("--lr-warmup-iters 4 --lr-warmup-init 1e-5 --lr-decay-style constant")
    assert sched.get_lr() == pytest.approx(1e-5)
    got = lrs_at(sched, [2, 4, 50, 100, 500])
    assert got == pytest.approx([1e-5 + 0.5 * (1e-3 - 1e-5), 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_warmup_fraction_and_decay_iters():
    sched = scheduler_for("--lr-warmup-fraction 0.1 --lr-decay-iters 50")
    assert (sched.lr_warmup_steps, sched.lr_decay_steps) == (20, 200)
    got = lrs_at(sched, [5, 30, 50, 60])
    # decay over iterations 5..50: at 30, 20 of 45 iterations are left -> 1e-4 + (4/9) * 9e-4
    assert got == pytest.approx([1e-3, 5e-4, 1e-4, 1e-4], rel=1e-12)


def test_train_samples_are_turned_into_iterations():
    flags = tiny_flags(**MODEL, global_batch_size=4, min_lr=1e-4, train_samples=400, lr_warmup_samples=40)
    cfg = parse_config(flags).finalize(1)
    sched = OptimizerParamScheduler.from_config(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), cfg
    )
    assert (sched.lr_warmup_steps, sched.lr_decay_steps) == (40, 400)


def test_step_writes_lr_into_every_param_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=9.0)
    sched = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=1.0,
        min_lr=0.0,
        lr_warmup_steps=8,
        lr_decay_steps=16,
        lr_decay_style="linear",
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    assert sched.step(2) == 0.25
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


def test_state_dict_round_trip_resumes_the_schedule():
    sched = scheduler_for("--lr-warmup-iters 10 --lr-decay-style cosine")
    lrs_at(sched, [37])
    state = sched.state_dict()
    assert state["num_steps"] == 148
    fresh = scheduler_for("--lr-warmup-iters 10 --lr-decay-style cosine")
    fresh.load_state_dict(state)
    assert fresh.get_lr() == sched.get_lr()
    assert fresh.optimizer.param_groups[0]["lr"] == sched.get_lr()
    assert lrs_at(fresh, [38], gbs=4) == lrs_at(sched, [38], gbs=4)


def test_unknown_decay_style_is_a_user_error():
    with pytest.raises(
        UserError, match="--lr-decay-style WSD is not supported; choose one of constant, linear, cosine"
    ):
        OptimizerParamScheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1),
            init_lr=0,
            max_lr=1,
            min_lr=0,
            lr_warmup_steps=0,
            lr_decay_steps=1,
            lr_decay_style="WSD",
        )
