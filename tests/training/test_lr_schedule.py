"""OptimizerParamScheduler: Megatron's warmup, decay (incl. WSD, inverse-square-root), weight-decay and\ndecoupled-lr values at chosen iterations, counted in samples, also against megatron-core's own scheduler."""

import math

import pytest
import torch
from helpers import tiny_flags
from megatron_core_reference import megatron_core_reference

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.optimizer import build_optimizer

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
        UserError, match="--lr-decay-style step is not supported; choose one of constant, linear"
    ):
        OptimizerParamScheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1),
            init_lr=0,
            max_lr=1,
            min_lr=0,
            lr_warmup_steps=0,
            lr_decay_steps=1,
            lr_decay_style="step",
        )


# ---- WSD and inverse-square-root: Megatron's formulas written out ------------------------------------
MAX, MIN = 1e-3, 1e-4


@pytest.mark.parametrize(
    "style, coeff_at_quarter",
    [
        ("linear", 1.0 - 0.25),
        ("cosine", 0.5 * (math.cos(math.pi * 0.25) + 1.0)),
        ("exponential", 2.0 * 0.5**0.25 - 1.0),
        ("minus_sqrt", 1.0 - math.sqrt(0.25)),
    ],
)
def test_wsd_is_stable_then_anneals_over_the_last_wsd_iterations(style, coeff_at_quarter):
    sched = scheduler_for(
        f"--lr-warmup-iters 10 --lr-decay-style WSD --lr-wsd-decay-iters 20 --lr-wsd-decay-style {style}"
    )
    # Spans in samples (x4): decay over 400, annealing the last 80, i.e. from sample 320 (iteration 80).
    assert (sched.lr_decay_steps, sched.wsd_decay_steps) == (400, 80)
    got = lrs_at(sched, [5, 10, 11, 50, 80, 85, 100, 101])
    quarter = MIN + coeff_at_quarter * (MAX - MIN)  # iteration 85: 20 of the 80 annealing samples done
    # every annealing curve reaches --min-lr at the end of the decay span (coeff 0 at ratio 1)
    expected = [5e-4, MAX, MAX, MAX, MAX, quarter, MIN, MIN]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_wsd_counts_samples_with_train_samples():
    flags = tiny_flags(
        **MODEL,
        global_batch_size=4,
        min_lr=MIN,
        train_samples=400,
        lr_decay_style="WSD",
        lr_wsd_decay_samples=100,
        lr_wsd_decay_style="linear",
    )
    sched = OptimizerParamScheduler.from_config(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), parse_config(flags).finalize(1)
    )
    assert (sched.lr_decay_steps, sched.wsd_decay_steps) == (400, 100)
    # anneal from sample 300: at 340, 40 of 100 done -> coeff 0.6
    assert lrs_at(sched, [75, 85]) == pytest.approx([MAX, MIN + 0.6 * (MAX - MIN)], rel=1e-12)


def test_inverse_square_root_decays_from_the_end_of_warmup():
    sched = scheduler_for("--lr-warmup-iters 10 --lr-decay-style inverse-square-root --min-lr 2e-4")
    got = lrs_at(sched, [5, 10, 40, 90, 100, 101])
    # lr = max_lr * sqrt(warmup samples) / sqrt(samples), never below --min-lr; --min-lr past the decay span
    expected = [
        5e-4,
        MAX,
        MAX * math.sqrt(40 / 160),
        max(2e-4, MAX * math.sqrt(40 / 360)),
        MAX * math.sqrt(0.1),
        2e-4,
    ]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] > 2e-4 * 1.6  # sqrt(1/9) = 0.33: not yet clamped


def test_inverse_square_root_without_warmup_uses_one_sample():
    # Megatron takes max(warmup, 1) and max(samples, 1): no warmup means max_lr / sqrt(samples).
    sched = scheduler_for("--lr-decay-style inverse-square-root --min-lr 0")
    assert sched.get_lr() == MAX
    assert lrs_at(sched, [1, 25]) == pytest.approx([MAX / 2, MAX / 10], rel=1e-12)


# ---- weight decay increments -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "style, expected_at_quarter",
    [("linear", 0.25 * 0.08), ("cosine", 0.5 * (math.cos(math.pi * 0.75) + 1.0) * 0.08)],
)
def test_weight_decay_rises_from_start_to_end_on_decayed_groups_only(style, expected_at_quarter):
    net = torch.nn.Linear(3, 2)  # weight: decayed; bias: wd_mult 0
    cfg = parse_config(
        tiny_flags(**MODEL, global_batch_size=4, train_iters=100)
        + f"--weight-decay-incr-style {style} --start-weight-decay 0.02 --end-weight-decay 0.1".split()
    ).finalize(1)
    optimizer = build_optimizer(net, cfg)
    sched = OptimizerParamScheduler.from_config(optimizer, cfg)
    assert (sched.start_wd, sched.end_wd, sched.wd_incr_steps) == (0.02, 0.1, 400)
    weight_group, bias_group = optimizer.param_groups
    assert (weight_group["weight_decay"], bias_group["weight_decay"]) == (0.02, 0.0)
    for iteration, wd in [(25, 0.02 + expected_at_quarter), (50, 0.06), (100, 0.1), (150, 0.1)]:
        sched.step(iteration * 4 - sched.num_steps)
        assert weight_group["weight_decay"] == pytest.approx(wd, rel=1e-12)
        assert bias_group["weight_decay"] == 0.0


def test_constant_weight_decay_is_weight_decay():
    cfg = parse_config(tiny_flags(**MODEL, train_iters=10) + ["--weight-decay", "0.3"]).finalize(1)
    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg)
    sched = OptimizerParamScheduler.from_config(optimizer, cfg)
    sched.step(12)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    assert (sched.state_dict()["start_wd"], sched.state_dict()["wd_incr_style"]) == (0.3, "constant")


# ---- decoupled learning rate -------------------------------------------------------------------------
def _groups_by_name(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("decoupled_min_lr, decoupled_floor", [("--decoupled-min-lr 5e-4", 5e-4), ("", MIN)])
def test_decoupled_lr_schedules_the_word_embeddings_and_output_layer(decoupled_min_lr, decoupled_floor):
    flags = tiny_flags(
        **MODEL, global_batch_size=4, min_lr=MIN, train_iters=100, untie_embeddings_and_output_weights=True
    )
    cfg = parse_config(
        flags + f"--lr-warmup-iters 10 --decoupled-lr 5e-3 {decoupled_min_lr}".split()
    ).finalize(1)
    model = GPTModel(cfg)
    optimizer = build_optimizer(model, cfg)
    sched = OptimizerParamScheduler.from_config(optimizer, cfg)
    groups = _groups_by_name(optimizer, model)
    # Megatron's order: default, decoupled; then the no-weight-decay group (biases, norms).
    assert groups[1] == ["embedding.word_embeddings.weight", "output_layer.weight"]
    assert "embedding.position_embeddings.weight" in groups[0]
    assert [g["is_decoupled_lr"] for g in optimizer.param_groups] == [False, True, False]
    assert [g["wd_mult"] for g in optimizer.param_groups] == [1.0, 1.0, 0.0]
    for iteration, plain, decoupled in [
        (5, 0.5 * MAX, 0.5 * 5e-3),  # warmup from --lr-warmup-init 0 towards each group's peak
        (55, MIN + 0.5 * (MAX - MIN), decoupled_floor + 0.5 * (5e-3 - decoupled_floor)),
        (101, MIN, decoupled_floor),
    ]:
        logged = sched.step(iteration * 4 - sched.num_steps)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([plain, decoupled, plain], rel=1e-12)
        assert logged == pytest.approx(plain, rel=1e-12)  # the learning rate Megatron logs


# ---- the same numbers as megatron-core's OptimizerParamScheduler -------------------------------------
# Each run: flags on top of batch 4, lr 1e-3 -> --min-lr 1e-4, and --train-iters 100 unless it counts samples.
CORE_RUNS = {
    "constant": "--lr-warmup-iters 7 --lr-decay-style constant --lr-warmup-init 1e-5",
    "linear": "--lr-warmup-iters 7 --lr-decay-style linear",
    "cosine": "--lr-warmup-iters 7 --lr-decay-style cosine",
    "linear-fraction": "--lr-warmup-fraction 0.13 --lr-decay-style linear --lr-decay-iters 90",
    "isr": "--lr-warmup-iters 7 --lr-decay-style inverse-square-root",
    "isr-no-warmup": "--lr-decay-style inverse-square-root --lr-decay-iters 60",
    "wsd-exponential": "--lr-warmup-iters 7 --lr-decay-style WSD --lr-wsd-decay-iters 30 --lr-wsd-decay-style exponential",
    "wsd-linear": "--lr-warmup-iters 7 --lr-decay-style WSD --lr-wsd-decay-iters 30 --lr-wsd-decay-style linear",
    "wsd-cosine": "--lr-warmup-iters 7 --lr-decay-style WSD --lr-wsd-decay-iters 30 --lr-wsd-decay-style cosine",
    "wsd-minus-sqrt": "--lr-warmup-iters 7 --lr-decay-style WSD --lr-wsd-decay-iters 30 --lr-wsd-decay-style minus_sqrt",
    "wsd-whole-span": "--lr-decay-style WSD --lr-wsd-decay-iters 100 --lr-wsd-decay-style cosine --lr-warmup-init 1e-5",
    "wsd-default-style": "--lr-warmup-iters 3 --lr-decay-style WSD --lr-wsd-decay-iters 10 --lr-decay-iters 80",
    "wsd-samples": "--train-samples 400 --lr-warmup-samples 30 --lr-decay-style WSD --lr-wsd-decay-samples 101 "
    "--lr-wsd-decay-style minus_sqrt",
    "samples-cosine": "--train-samples 400 --lr-warmup-samples 30 --lr-decay-samples 350 --lr-decay-style cosine",
    "wd-linear": "--weight-decay-incr-style linear --start-weight-decay 0.01 --end-weight-decay 0.2",
    "wd-cosine": "--weight-decay-incr-style cosine --start-weight-decay 0.01 --end-weight-decay 0.2",
    "wd-constant": "--weight-decay 0.3 --lr-decay-style cosine",
    "wd-samples": "--train-samples 400 --weight-decay-incr-style cosine --start-weight-decay 0 --end-weight-decay 0.1",
    "decoupled": "--lr-warmup-iters 7 --lr-decay-style cosine --decoupled-lr 3e-3 --decoupled-min-lr 2e-4",
    "decoupled-no-min": "--lr-warmup-iters 7 --lr-decay-style WSD --lr-wsd-decay-iters 20 --decoupled-lr 3e-3",
}  # fmt: skip


def core_config(extra: str):
    iters = [] if "--train-samples" in extra else ["--train-iters", "100"]
    flags = tiny_flags(**MODEL, global_batch_size=4, min_lr=1e-4, train_iters=None) + iters + extra.split()
    return parse_config(flags).finalize(1)


def megatron_spans(cfg) -> dict:
    """Megatron's get_optimizer_param_scheduler (training.py), written out: its scheduler arguments."""
    gbs = cfg.global_batch_size
    if cfg.train_samples is None:
        decay = (cfg.lr_decay_iters or cfg.train_iters) * gbs
        wd_incr = cfg.train_iters * gbs
        wsd = cfg.lr_wsd_decay_iters * gbs if cfg.lr_wsd_decay_iters is not None else None
        warmup_given = cfg.lr_warmup_iters * gbs
    else:
        decay = cfg.lr_decay_samples or cfg.train_samples
        wd_incr = cfg.train_samples
        wsd = cfg.lr_wsd_decay_samples
        warmup_given = cfg.lr_warmup_samples
    constant_wd = cfg.weight_decay_incr_style == "constant"
    return dict(
        init_lr=cfg.lr_warmup_init,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_fraction * decay
        if cfg.lr_warmup_fraction is not None
        else warmup_given,
        lr_decay_steps=decay,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay if constant_wd else cfg.start_weight_decay,
        end_wd=cfg.weight_decay if constant_wd else cfg.end_weight_decay,
        wd_incr_steps=wd_incr,
        wd_incr_style=cfg.weight_decay_incr_style,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=cfg.lr_wsd_decay_style,
    )


def megatron_groups(cfg) -> list[dict]:
    """Megatron's param-group overrides (core.optimizer): default and no-weight-decay groups with --lr /
    --min-lr; with --decoupled-lr an embedding/output group with it (and --decoupled-min-lr if given)."""
    groups = [
        {"wd_mult": 1.0, "max_lr": cfg.lr, "min_lr": cfg.min_lr},
        {"wd_mult": 0.0, "max_lr": cfg.lr, "min_lr": cfg.min_lr},
    ]
    if cfg.decoupled_lr is not None:
        decoupled = {"wd_mult": 1.0, "max_lr": cfg.decoupled_lr, "min_lr": cfg.min_lr}
        if cfg.decoupled_min_lr is not None:
            decoupled["min_lr"] = cfg.decoupled_min_lr
        groups.append(decoupled)
    return groups


def core_increments(cfg) -> list[int]:
    """Every iteration of the run and 30 past its end, then a few uneven steps (a ramp-up's batches)."""
    return [cfg.global_batch_size] * (cfg.train_iters + 30) + [1, 3, 7, 2, 5]


@pytest.fixture(scope="module")
def core_schedules() -> dict:
    requests = {}
    for name, extra in CORE_RUNS.items():
        cfg = core_config(extra)
        requests[name] = {
            "kind": "scheduler",
            "kwargs": megatron_spans(cfg),
            "groups": megatron_groups(cfg),
            "increments": core_increments(cfg),
        }
    return megatron_core_reference(requests)


@pytest.mark.parametrize("name", list(CORE_RUNS))
def test_lr_and_wd_equal_megatron_cores_scheduler_at_every_step(name, core_schedules):
    cfg = core_config(CORE_RUNS[name])
    model = GPTModel(cfg) if cfg.decoupled_lr is not None else torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg)
    sched = OptimizerParamScheduler.from_config(optimizer, cfg)
    spans = megatron_spans(cfg)
    assert (sched.lr_warmup_steps, sched.lr_decay_steps, sched.wsd_decay_steps, sched.wd_incr_steps) == (
        spans["lr_warmup_steps"],
        spans["lr_decay_steps"],
        spans["wsd_decay_steps"],
        spans["wd_incr_steps"],
    )
    # Our groups in Megatron's reference order: default (decayed), no weight decay, decoupled.
    by_kind = {}
    for group in optimizer.param_groups:
        by_kind[(group["is_decoupled_lr"], group["wd_mult"])] = group
    ours = [by_kind[(False, 1.0)], by_kind[(False, 0.0)]] + (
        [by_kind[(True, 1.0)]] if cfg.decoupled_lr else []
    )
    reference = core_schedules[name]
    got = [[[g["lr"], g["weight_decay"]] for g in ours]]
    for increment in core_increments(cfg):
        sched.step(increment)
        got.append([[g["lr"], g["weight_decay"]] for g in ours])
    assert got == reference  # exactly: the same formulas in the same order
    # The runs do what their flags say (a reference that never moves would pass the equality above).
    lrs = [step[0][0] for step in reference]
    if cfg.lr_decay_style != "constant":
        assert max(lrs) == pytest.approx(1e-3, rel=5e-3) and lrs[-1] == pytest.approx(1e-4)
    wds = [step[0][1] for step in reference]
    if name == "wd-constant":
        assert set(wds) == {0.3}
    if cfg.decoupled_lr is not None:
        assert max(step[2][0] for step in reference) == pytest.approx(3e-3, rel=5e-3)
    if cfg.weight_decay_incr_style != "constant":
        assert wds[0] == cfg.start_weight_decay and wds[-1] == cfg.end_weight_decay
        assert len(set(wds)) > 50  # rises at every step of the run


def test_decoupled_lr_is_in_the_log_line_and_tensorboard(tmp_path):
    # Megatron's training_log: " decoupled learning rate: X |" after the learning rate, and the
    # decoupled-learning-rate scalar; X is the embedding/output groups' lr at that iteration.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_lite.training.training import pretrain

    flags = tiny_flags(**MODEL, global_batch_size=4, train_iters=4, log_interval=2)
    cfg = parse_config(
        flags
        + f"--lr-warmup-iters 4 --lr-decay-iters 8 --decoupled-lr 8e-3 --tensorboard-dir {tmp_path}".split()
    )
    lines = [line for line in pretrain(cfg).log_lines if "consumed samples:" in line]
    decoupled = [float(line.split("decoupled learning rate:")[1].split("|")[0]) for line in lines]
    plain = [float(line.split("| learning rate:")[1].split("|")[0]) for line in lines]
    # Warmup from 0: iterations 2 and 4 of 4 are halfway and at each group's peak.
    assert decoupled == pytest.approx([4e-3, 8e-3]) and plain == pytest.approx([0.5 * cfg.lr, cfg.lr])
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [e.value for e in events.Scalars("decoupled-learning-rate")] == pytest.approx(
        [2e-3, 4e-3, 6e-3, 8e-3]
    )
