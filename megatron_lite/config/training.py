"""Optimization settings: batch sizes, iterations, learning-rate schedule, optimizer, precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, require


@dataclass
class TrainingArgs:
    """Optimization settings: batch sizes, iterations, learning-rate schedule, optimizer, precision."""

    micro_batch_size: int | None = _f(
        None, "Samples per micro batch per data-parallel rank.", group="training"
    )
    global_batch_size: int | None = _f(
        None, "Samples per optimizer step (default micro-batch-size x data-parallel size).", group="training"
    )
    train_iters: int | None = _f(None, "Number of optimizer steps.", group="training")
    train_samples: int | None = _f(
        None, "Number of training samples (instead of --train-iters).", group="training"
    )
    lr: float | None = _f(None, "Peak learning rate.", group="training")
    min_lr: float = _f(0.0, "Learning rate at the end of decay.", group="training")
    lr_decay_style: str = _f(
        "linear", "Learning-rate decay.", choices=["constant", "linear", "cosine"], group="training"
    )
    lr_decay_iters: int | None = _f(
        None, "Iterations to decay over (default --train-iters).", group="training"
    )
    lr_decay_samples: int | None = _f(None, "Samples to decay over (with --train-samples).", group="training")
    lr_warmup_iters: int = _f(0, "Linear warmup iterations.", group="training")
    lr_warmup_samples: int = _f(0, "Linear warmup samples (with --train-samples).", group="training")
    lr_warmup_fraction: float | None = _f(None, "Warmup as a fraction of the decay span.", group="training")
    lr_warmup_init: float = _f(0.0, "Learning rate at the start of warmup.", group="training")
    optimizer: str = _f("adam", "Optimizer (AdamW-style Adam).", choices=["adam"], group="training")
    weight_decay: float = _f(
        0.01, "Decoupled weight decay (not applied to biases and norms).", group="training"
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
    per_step = cfg.micro_batch_size * cfg.data_parallel_size
    if cfg.global_batch_size is None:
        cfg.global_batch_size = per_step
    if cfg.global_batch_size <= 0 or cfg.global_batch_size % per_step != 0:
        fail(
            f"--global-batch-size {cfg.global_batch_size} is not divisible by --micro-batch-size "
            f"{cfg.micro_batch_size} x data-parallel size {cfg.data_parallel_size}"
        )
    if (cfg.train_iters is None) == (cfg.train_samples is None):
        fail("give exactly one of --train-iters and --train-samples")
    if cfg.train_samples is not None:
        # Megatron trains on samples; we keep a fixed global batch, so samples map onto iterations.
        cfg.train_iters = cfg.train_samples // cfg.global_batch_size
        if cfg.lr_decay_samples is not None and cfg.lr_decay_iters is None:
            cfg.lr_decay_iters = cfg.lr_decay_samples // cfg.global_batch_size
        if cfg.lr_warmup_samples and not cfg.lr_warmup_iters:
            cfg.lr_warmup_iters = cfg.lr_warmup_samples // cfg.global_batch_size
    if cfg.train_iters < 0:
        fail(f"--train-iters must be >= 0, got {cfg.train_iters}")
    require(cfg, "lr")
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters
    if cfg.lr_warmup_fraction is not None and cfg.lr_warmup_iters:
        fail("--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
    if cfg.min_lr > cfg.lr:
        fail(f"--min-lr {cfg.min_lr} is larger than --lr {cfg.lr}")
    if cfg.bf16 and cfg.fp16:
        fail("--bf16 and --fp16 are exclusive; give one")
    if cfg.data_path is not None and len(cfg.data_path) == 0:
        cfg.data_path = None
