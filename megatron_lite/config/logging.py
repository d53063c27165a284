"""Logging, evaluation and exit settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name


@dataclass
class LoggingArgs:
    """Logging, evaluation and exit settings."""

    log_interval: int = _f(100, "Iterations between console log lines.", group="logging")
    eval_interval: int = _f(1000, "Iterations between evaluations.", group="logging")
    eval_iters: int = _f(100, "Batches per evaluation.", group="logging")
    skip_train: bool = _f(False, "Only evaluate.", group="logging")
    tensorboard_dir: str | None = _f(None, "Write TensorBoard logs here.", group="logging")
    tensorboard_log_interval: int = _f(1, "Iterations between TensorBoard points.", group="logging")
    tensorboard_queue_size: int = _f(1000, "TensorBoard event queue size.", group="logging")
    log_throughput: bool = _f(False, "Print TFLOP/s in the log line.", group="logging")
    log_timers_to_tensorboard: bool = _f(
        False, "Write iteration time and throughput to TensorBoard.", group="logging"
    )
    log_validation_ppl_to_tensorboard: bool = _f(
        False, "Write validation perplexity to TensorBoard.", group="logging"
    )
    log_memory_to_tensorboard: bool = _f(False, "Write memory use to TensorBoard.", group="logging")
    log_params_norm: bool = _f(False, "Compute and log the parameter norm.", group="logging")
    peak_tflops: float | None = _f(
        None, "Device peak TFLOP/s for MFU (default: a table of GPUs, or measured on CPU).", group="logging"
    )
    exit_interval: int | None = _f(
        None, "Save and exit when the iteration is divisible by this.", group="logging"
    )
    exit_duration_in_mins: float | None = _f(None, "Save and exit after this many minutes.", group="logging")
    exit_signal_handler: bool = _f(
        True, "Save and exit on SIGTERM/SIGINT (always on in megatron-lite).", group="logging"
    )


def check_run(cfg: Any) -> None:
    split_paths = (cfg.train_data_path, cfg.valid_data_path, cfg.test_data_path)
    if not cfg.mock_data and cfg.data_path is None and all(p is None for p in split_paths):
        fail("no training data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    if cfg.data_path is not None and any(p is not None for p in split_paths):
        fail("--data-path and --train/valid/test-data-path are exclusive; give one kind")
    if cfg.split is not None and any(p is not None for p in split_paths):
        fail("--split applies to --data-path only, not to --train/valid/test-data-path")
    if cfg.save is not None and cfg.save_interval is None:
        fail("--save needs --save-interval")
    if cfg.save_interval is not None and cfg.save_interval <= 0:
        fail(f"--save-interval must be positive, got {cfg.save_interval}")
    for name in ("log_interval", "eval_interval", "tensorboard_log_interval"):
        if getattr(cfg, name) <= 0:
            fail(f"{flag_name(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_iters < 0:
        fail(f"--eval-iters must be >= 0, got {cfg.eval_iters}")
    if cfg.save_keep_last is not None and cfg.save_keep_last < 1:
        fail(f"--save-keep-last must be >= 1, got {cfg.save_keep_last}")
