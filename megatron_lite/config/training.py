"""Optimization settings: batch sizes, iterations, learning-rate schedule, optimizer, precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name, require
from megatron_lite.training.microbatches import (
    build_num_microbatches_calculator,
    rampup_train_iters,
    step_schedule_notices,
    step_schedule_train_iters,
)


@dataclass
class TrainingArgs:
    """Optimization settings: batch sizes, iterations, learning-rate schedule, optimizer, precision."""

    micro_batch_size: int | None = _f(
        None, "Samples per micro batch per data-parallel rank.", group="training"
    )
    global_batch_size: int | None = _f(
        None, "Samples per optimizer step (default micro-batch-size x data-parallel size).", group="training"
    )
    rampup_batch_size: list[int] | None = _f(
        None,
        "Ramp the global batch up: START INCREMENT SAMPLES (START grows by INCREMENT up to "
        "--global-batch-size over SAMPLES consumed samples; needs --train-samples).",
        nargs=3,
        group="training",
    )
    step_batch_size_schedule: str | None = _f(
        None,
        'Step-wise global batch schedule "THRESHOLD:BS THRESHOLD:BS ..." (thresholds in tokens, with K, M, '
        'B, T suffixes; the first must be 0), e.g. "0:768 250B:1536 500B:3072". Excludes '
        "--global-batch-size and --decrease-batch-size-if-needed; --rampup-batch-size is then ignored.",
        group="training",
    )
    decrease_batch_size_if_needed: bool = _f(
        False,
        "Round the global batch down to a multiple of micro batch x data-parallel size instead of failing.",
        group="training",
    )
    train_iters: int | None = _f(None, "Number of optimizer steps.", group="training")
    train_samples: int | None = _f(
        None, "Number of training samples (instead of --train-iters).", group="training"
    )
    lr: float | None = _f(None, "Peak learning rate.", group="training")
    min_lr: float = _f(0.0, "Learning rate at the end of decay.", group="training")
    lr_decay_style: str = _f(
        "linear",
        "Learning-rate decay.",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        group="training",
    )
    lr_wsd_decay_style: str = _f(
        "exponential",
        "Decay of the annealing phase of WSD.",
        choices=["exponential", "linear", "cosine", "minus_sqrt"],
        group="training",
    )
    lr_wsd_decay_iters: int | None = _f(
        None, "Iterations of the WSD annealing phase (with --train-iters).", group="training"
    )
    lr_wsd_decay_samples: int | None = _f(
        None, "Samples of the WSD annealing phase (with --train-samples).", group="training"
    )
    lr_decay_iters: int | None = _f(
        None, "Iterations to decay over (default --train-iters).", group="training"
    )
    lr_decay_samples: int | None = _f(None, "Samples to decay over (with --train-samples).", group="training")
    lr_warmup_iters: int = _f(0, "Linear warmup iterations.", group="training")
    lr_warmup_samples: int = _f(0, "Linear warmup samples (with --train-samples).", group="training")
    lr_warmup_fraction: float | None = _f(None, "Warmup as a fraction of the decay span.", group="training")
    lr_warmup_init: float = _f(0.0, "Learning rate at the start of warmup.", group="training")
    decoupled_lr: float | None = _f(
        None, "Peak learning rate of the word-embedding and output-layer weights.", group="training"
    )
    decoupled_min_lr: float | None = _f(
        None, "Minimum learning rate of the word-embedding and output-layer weights.", group="training"
    )
    optimizer: str = _f("adam", "Optimizer (Adam is AdamW-style).", choices=["adam", "sgd"], group="training")
    sgd_momentum: float = _f(0.9, "Momentum of --optimizer sgd.", group="training")
    weight_decay: float = _f(
        0.01, "Weight decay (not applied to biases and other 1-D parameters).", group="training"
    )
    start_weight_decay: float | None = _f(
        None, "Weight decay at the start (with --weight-decay-incr-style linear/cosine).", group="training"
    )
    end_weight_decay: float | None = _f(
        None, "Weight decay at the end (with --weight-decay-incr-style linear/cosine).", group="training"
    )
    weight_decay_incr_style: str = _f(
        "constant",
        "How weight decay goes from --start-weight-decay to --end-weight-decay over training.",
        choices=["constant", "linear", "cosine"],
        group="training",
    )
    calculate_per_token_loss: bool = _f(
        False,
        "Normalise the loss by the non-masked tokens of the whole global batch (all micro batches and "
        "data-parallel ranks) instead of each micro batch's own.",
        group="training",
    )
    clip_grad: float = _f(1.0, "Clip the global gradient norm to this (0 disables).", group="training")
    adam_beta1: float = _f(0.9, "Adam beta1.", group="training")
    adam_beta2: float = _f(0.999, "Adam beta2.", group="training")
    adam_eps: float = _f(1e-8, "Adam epsilon.", group="training")
    bf16: bool = _f(False, "Train with bf16 autocast (CPU and GPU).", group="training")
    fp16: bool = _f(False, "Train with fp16 autocast and dynamic loss scaling (GPU).", group="training")
    loss_scale: float | None = _f(None, "Static loss scale for --fp16 (default dynamic).", group="training")
    initial_loss_scale: float = _f(2.0**32, "Initial dynamic loss scale.", group="training")
    min_loss_scale: float = _f(1.0, "Smallest dynamic loss scale.", group="training")
    loss_scale_window: float = _f(1000.0, "Good iterations before the loss scale grows.", group="training")
    hysteresis: int = _f(2, "Overflows tolerated before the loss scale shrinks.", group="training")
    max_consecutive_skipped_iterations: int = _f(
        20, "Stop the run after this many non-finite iterations in a row.", group="training"
    )
    seed: int = _f(1234, "Random seed of weights, dropout and data order.", group="training")
    device: str = _f(
        "auto",
        "Device: auto (cuda when available), cpu or cuda.",
        choices=["auto", "cpu", "cuda"],
        group="training",
    )
    compile: bool = _f(False, "Compile the model with torch.compile.", group="training")
    fp32_matmul_precision: str = _f(
        "auto",
        "fp32 matmul path: auto (a faster path only if measured faster and fp32-exact), or torch's "
        "highest, high or medium (see torch.set_float32_matmul_precision).",
        choices=["auto", "highest", "high", "medium"],
        group="training",
    )


def derive_training(cfg: Any) -> None:
    require(cfg, "micro_batch_size")
    if cfg.micro_batch_size <= 0:
        fail(f"--micro-batch-size must be positive, got {cfg.micro_batch_size}")
    # Megatron's flag: a finalized config has the default filled in, so remember what the user gave.
    if not hasattr(cfg, "_is_global_batch_size_explicitly_specified"):
        cfg._is_global_batch_size_explicitly_specified = cfg.global_batch_size is not None
    if cfg.step_batch_size_schedule is not None:
        _check_step_schedule_flags(cfg)
    if cfg.global_batch_size is None:
        cfg.global_batch_size = cfg.micro_batch_size * cfg.data_parallel_size
    if cfg.global_batch_size <= 0:
        fail(f"--global-batch-size must be positive, got {cfg.global_batch_size}")
    # Megatron's calculator checks the batch sizes (and every size a ramp-up visits, below).
    calculator = build_num_microbatches_calculator(cfg)
    if (cfg.train_iters is None) == (cfg.train_samples is None):
        fail("give exactly one of --train-iters and --train-samples")
    _check_iteration_or_sample_based(cfg)
    if cfg.train_samples is not None:
        # Megatron counts the schedule in samples (see lr_schedule_steps); the loop counts iterations.
        if cfg.step_batch_size_schedule is not None:
            cfg.train_iters = step_schedule_train_iters(calculator, cfg.train_samples)
        elif cfg.rampup_batch_size is not None:
            cfg.train_iters = rampup_train_iters(calculator, cfg.train_samples)
        else:
            cfg.train_iters = cfg.train_samples // cfg.global_batch_size
        if cfg.lr_decay_samples is not None and cfg.lr_decay_iters is None:
            cfg.lr_decay_iters = cfg.lr_decay_samples // cfg.global_batch_size
        if cfg.lr_warmup_samples and not cfg.lr_warmup_iters:
            cfg.lr_warmup_iters = cfg.lr_warmup_samples // cfg.global_batch_size
    if cfg.train_iters < 0:
        fail(f"--train-iters must be >= 0, got {cfg.train_iters}")
    if cfg.step_batch_size_schedule is not None:
        _add_notices(cfg, step_schedule_notices(calculator, cfg.train_iters))
    require(cfg, "lr")
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters
    if cfg.min_lr > cfg.lr:
        fail(f"--min-lr {cfg.min_lr} is larger than --lr {cfg.lr}")
    _check_schedule(cfg)
    _check_weight_decay(cfg)
    if cfg.bf16 and cfg.fp16:
        fail("--bf16 and --fp16 are exclusive; give one")
    if cfg.data_path is not None and len(cfg.data_path) == 0:
        cfg.data_path = None


def _check_step_schedule_flags(cfg: Any) -> None:
    """What Megatron-LM main refuses next to --step-batch-size-schedule, and what it ignores."""
    if cfg.decrease_batch_size_if_needed:
        fail("--step-batch-size-schedule does not support --decrease-batch-size-if-needed")
    notices = []
    if cfg._is_global_batch_size_explicitly_specified:
        # Megatron refuses both, yet its own examples/gpt3 script and gpt_config.yaml give both, with
        # --global-batch-size the schedule's last batch. That one value only restates the schedule: accept it.
        from megatron_lite.training.microbatches import parse_step_batch_size_schedule

        final = parse_step_batch_size_schedule(cfg.step_batch_size_schedule, cfg.seq_length)[-1][1]
        if cfg.global_batch_size != final:
            fail(
                f"--global-batch-size {cfg.global_batch_size} differs from the last batch size of "
                f"--step-batch-size-schedule ({final}); leave --global-batch-size out (the schedule sets it)"
            )
        notices.append(
            f"--global-batch-size {final}: the last batch size of --step-batch-size-schedule; the schedule "
            "sets the batch (Megatron-LM refuses the pair, its own examples give it)"
        )
        cfg.global_batch_size = None
        cfg._is_global_batch_size_explicitly_specified = False
    if cfg.rampup_batch_size is not None:
        notices.append(
            "--rampup-batch-size: ignored with --step-batch-size-schedule (as in Megatron-LM main)"
        )
    if cfg.train_iters is not None:
        notices.append(
            "--step-batch-size-schedule with --train-iters: as in Megatron, the learning-rate and weight-decay "
            "spans are iterations x micro batch x data-parallel size samples (--global-batch-size's default), "
            "not the schedule's batches; --train-samples counts real samples"
        )
    _add_notices(cfg, notices)


def _add_notices(cfg: Any, notices: list[str]) -> None:
    for notice in notices:
        if notice not in cfg.startup_notices:
            cfg.startup_notices.append(notice)


def _check_iteration_or_sample_based(cfg: Any) -> None:
    """Megatron's rule: the schedule is given in iterations with --train-iters, in samples with --train-samples."""
    if cfg.train_iters is not None:
        # Megatron-LM main ignores --rampup-batch-size next to a step schedule, so it is not checked then.
        ramp = () if cfg.step_batch_size_schedule is not None else ("rampup_batch_size",)
        for name in ("lr_decay_samples", *ramp):
            if getattr(cfg, name) is not None:
                fail(f"{flag_name(name)} needs --train-samples (it counts samples), not --train-iters")
        if cfg.lr_warmup_samples:
            fail(
                "--lr-warmup-samples needs --train-samples (it counts samples); with --train-iters give --lr-warmup-iters"
            )
        if cfg.lr_warmup_fraction is not None and cfg.lr_warmup_iters:
            fail("--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
    else:
        if cfg.lr_decay_iters is not None:
            fail("--lr-decay-iters needs --train-iters; with --train-samples give --lr-decay-samples")
        if cfg.lr_warmup_iters:
            fail("--lr-warmup-iters needs --train-iters; with --train-samples give --lr-warmup-samples")
        if cfg.lr_warmup_fraction is not None and cfg.lr_warmup_samples:
            fail("--lr-warmup-fraction and --lr-warmup-samples are exclusive; give one")


def lr_schedule_steps(cfg: Any) -> dict[str, float | int | None]:
    """Megatron's scheduler spans in samples (get_optimizer_param_scheduler): iteration counts times the
    global batch with --train-iters, sample counts as given with --train-samples."""
    gbs = cfg.global_batch_size
    if cfg.train_samples is None:
        decay = cfg.lr_decay_iters * gbs
        wsd = cfg.lr_wsd_decay_iters * gbs if cfg.lr_wsd_decay_iters is not None else None
        wd_incr = cfg.train_iters * gbs
        warmup_given = cfg.lr_warmup_iters * gbs
    else:
        decay = cfg.lr_decay_samples if cfg.lr_decay_samples is not None else cfg.train_samples
        wsd = cfg.lr_wsd_decay_samples
        wd_incr = cfg.train_samples
        warmup_given = cfg.lr_warmup_samples
    # A fraction gives a float span, as in Megatron (lr_warmup_fraction * lr_decay_steps).
    warmup = cfg.lr_warmup_fraction * decay if cfg.lr_warmup_fraction is not None else warmup_given
    return {"warmup": warmup, "decay": decay, "wsd_decay": wsd, "wd_incr": wd_incr}


def _check_schedule(cfg: Any) -> None:
    """What Megatron's OptimizerParamScheduler asserts, as one line naming the flag."""
    by_samples = cfg.train_samples is not None
    if cfg.lr_warmup_init > cfg.lr:
        fail(f"--lr-warmup-init {cfg.lr_warmup_init} is larger than --lr {cfg.lr}")
    if cfg.min_lr < 0:
        fail(f"--min-lr must be >= 0, got {cfg.min_lr}")
    wsd_flag = "--lr-wsd-decay-samples" if by_samples else "--lr-wsd-decay-iters"
    steps = lr_schedule_steps(cfg)
    if cfg.lr_decay_style == "WSD" and steps["wsd_decay"] is None:
        fail(f"--lr-decay-style WSD needs {wsd_flag} (the length of its annealing phase)")
    if cfg.decoupled_min_lr is not None and cfg.decoupled_lr is None:
        notice = "--decoupled-min-lr: no effect without --decoupled-lr (as in Megatron)"
        if notice not in cfg.startup_notices:
            cfg.startup_notices.append(notice)
    if cfg.skip_train or cfg.train_iters == 0:
        return  # Megatron skips the schedule checks when nothing trains
    unit = "samples" if by_samples else "iters"
    if steps["decay"] <= 0:
        fail(f"--lr-decay-{unit} must be positive, got {steps['decay']} samples to decay over")
    if steps["warmup"] >= steps["decay"]:
        warmup_flag = "--lr-warmup-fraction" if cfg.lr_warmup_fraction is not None else f"--lr-warmup-{unit}"
        fail(
            f"{warmup_flag}: the warmup ({steps['warmup']:g} samples) must be shorter than the decay span "
            f"({steps['decay']} samples, --lr-decay-{unit} or --train-{unit})"
        )


def _check_weight_decay(cfg: Any) -> None:
    """Megatron: constant weight decay is --weight-decay; linear/cosine need both ends, rising from start to end."""
    if cfg.weight_decay_incr_style == "constant":
        for name in ("start_weight_decay", "end_weight_decay"):
            if getattr(cfg, name) is not None:
                fail(
                    f"{flag_name(name)} needs --weight-decay-incr-style linear or cosine; constant uses --weight-decay"
                )
        return
    require(cfg, "start_weight_decay", "end_weight_decay")
    if cfg.start_weight_decay < 0:
        fail(f"--start-weight-decay must be >= 0, got {cfg.start_weight_decay}")
    if cfg.end_weight_decay < cfg.start_weight_decay:
        fail(
            f"--end-weight-decay {cfg.end_weight_decay} is smaller than --start-weight-decay "
            f"{cfg.start_weight_decay}; Megatron's schedule only increases weight decay"
        )


def weight_decay_range(cfg: Any) -> tuple[float, float]:
    """(start, end) weight decay: --weight-decay for both with the constant style, as Megatron sets them."""
    if cfg.weight_decay_incr_style == "constant":
        return cfg.weight_decay, cfg.weight_decay
    return cfg.start_weight_decay, cfg.end_weight_decay
