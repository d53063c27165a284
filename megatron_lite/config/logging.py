"""Logging, timing, evaluation and exit settings, and the run-time switches (garbage collection, determinism)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name

# The signal names Megatron-LM's --exit-signal accepts (signal.Signals on Linux).
EXIT_SIGNALS = [
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE", "SIGKILL", "SIGUSR1",
    "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGSTKFLT", "SIGCHLD", "SIGCONT", "SIGSTOP",
    "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH",
    "SIGIO", "SIGPWR", "SIGSYS", "SIGRTMIN", "SIGRTMAX",
]  # fmt: skip


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
    save_tokens_per_expert_interval: int | None = _f(
        None,
        "Every N iterations append each MoE layer's tokens per local expert, per micro batch, to "
        "{save}/tokens_per_expert/rank{R}.jsonl (Megatron's format), and write the global batch's "
        "expert load (max and min tokens per expert over the mean) to TensorBoard.",
        group="logging",
    )
    log_throughput: bool = _f(
        False,
        "Print Megatron's TFLOP/s per GPU in the log line (TensorBoard `throughput` with "
        "--log-timers-to-tensorboard).",
        group="logging",
    )
    log_timers_to_tensorboard: bool = _f(
        False,
        "Write `iteration-time`, the --timing-log-level timers as `{name}-time` (s per iteration, max over "
        "ranks) and, with --log-throughput, `throughput` to TensorBoard/wandb.",
        group="logging",
    )
    log_validation_ppl_to_tensorboard: bool = _f(
        False, "Write `lm loss validation ppl` to TensorBoard.", group="logging"
    )
    log_memory_to_tensorboard: bool = _f(
        False,
        "Write mem-reserved-bytes, mem-allocated-bytes, mem-max-allocated-bytes and mem-allocated-count: "
        "torch.cuda.memory_stats() on GPUs; on CPU this process's virtual size, resident size and peak "
        "resident size (/proc/self/status, or getrusage), and no count.",
        group="logging",
    )
    log_world_size_to_tensorboard: bool = _f(False, "Write `world-size` to TensorBoard.", group="logging")
    log_loss_scale_to_tensorboard: bool = _f(True, "Write `loss-scale` to TensorBoard.", group="logging")
    log_params_norm: bool = _f(False, "Compute and log the parameter norm.", group="logging")
    log_num_zeros_in_grad: bool = _f(
        False,
        "Count the zero gradient elements of the whole model (`num zeros`, TensorBoard `num-zeros`).",
        group="logging",
    )
    timing_log_level: int = _f(
        0,
        "Timers to measure and print after each log line: 0 only the iteration time (plus set-up, evaluation "
        "and checkpoint times as they happen); 1 also forward-backward, all-grads-sync and the optimizer "
        "steps; 2 also batch-generator, forward-compute and backward-compute per micro batch.",
        choices=[0, 1, 2],
        group="logging",
    )
    timing_log_option: str = _f(
        "minmax",
        "Timer statistics over ranks: max, minmax or all.",
        choices=["max", "minmax", "all"],
        group="logging",
    )
    barrier_with_L1_time: bool = _f(
        True,
        "Start level-1 timers with a barrier across ranks, so they time the work, not the wait.",
        group="logging",
    )
    wandb_project: str | None = _f(
        None,
        "Log the TensorBoard scalars to this Weights & Biases project (needs the wandb package; "
        "offline unless WANDB_MODE is set).",
        group="logging",
    )
    wandb_exp_name: str | None = _f(
        None, "The wandb run name (required with --wandb-project).", group="logging"
    )
    wandb_save_dir: str | None = _f(
        None, "Directory for wandb's files (default SAVE/wandb).", group="logging"
    )
    wandb_entity: str | None = _f(None, "The wandb entity (user or team).", group="logging")
    peak_tflops: float | None = _f(
        None, "Device peak TFLOP/s for MFU (default: a table of GPUs, or measured on CPU).", group="logging"
    )
    exit_interval: int | None = _f(
        None, "Save and exit when the iteration is divisible by this.", group="logging"
    )
    exit_duration_in_mins: float | None = _f(None, "Save and exit after this many minutes.", group="logging")
    exit_signal_handler: bool = _f(
        False,
        "On --exit-signal, finish the iteration, save (with --save) and exit 0 on every rank. Without it "
        "the signal keeps its default action (SIGTERM ends the process; Ctrl-C stops with one line).",
        group="logging",
    )
    exit_signal: str = _f(
        "SIGTERM", "The signal --exit-signal-handler handles.", choices=EXIT_SIGNALS, group="logging"
    )
    manual_gc: bool = _f(
        False,
        "Turn Python's automatic garbage collector off for training and collect at fixed points instead: "
        "at the start, every --manual-gc-interval iterations and around evaluations.",
        group="training",
    )
    manual_gc_interval: int = _f(
        0, "Iterations between full collections with --manual-gc (0: none during training).", group="training"
    )
    manual_gc_eval: bool = _f(
        True, "With --manual-gc, collect before and after each evaluation.", group="training"
    )
    deterministic_mode: bool = _f(
        False,
        "Bit-reproducible runs: torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8 and "
        "NCCL_ALGO=Ring unless set, and --fp32-matmul-precision auto resolved to highest.",
        group="training",
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
    _check_logging_and_switches(cfg)


def _check_logging_and_switches(cfg: Any) -> None:
    """What Megatron asserts about the timing, wandb, exit-signal and run-time settings, as one line each."""
    if cfg.wandb_project:  # Megatron's default '' means no wandb, as does leaving the flag out
        if not cfg.wandb_exp_name:
            # Megatron refuses a run without a name ("Please specify the wandb experiment name!").
            fail("--wandb-project needs --wandb-exp-name NAME, the wandb run's name (as in Megatron)")
        if not cfg.wandb_save_dir and not cfg.save:
            fail("--wandb-project needs --wandb-save-dir DIR (or --save, whose wandb/ folder is the default)")
    if cfg.save_tokens_per_expert_interval is not None and not cfg.save:
        fail("--save-tokens-per-expert-interval writes under --save; give --save DIR (and --save-interval)")
    if cfg.manual_gc_interval < 0:
        fail(f"--manual-gc-interval must be >= 0, got {cfg.manual_gc_interval}")
    if cfg.exit_signal_handler:
        if cfg.exit_signal not in signal.Signals.__members__:
            fail(f"--exit-signal {cfg.exit_signal}: no such signal on this system")
        if signal.Signals[cfg.exit_signal] in (signal.SIGKILL, signal.SIGSTOP):
            fail(f"--exit-signal {cfg.exit_signal} cannot be caught by a process; use SIGTERM or SIGUSR1")
    elif cfg.exit_signal != "SIGTERM":
        _notice(
            cfg, f"--exit-signal {cfg.exit_signal}: no effect without --exit-signal-handler (as in Megatron)"
        )
    if cfg.deterministic_mode and cfg.fp32_matmul_precision == "auto":
        # auto picks a matmul path by timing it, which two runs need not agree on.
        cfg.fp32_matmul_precision = "highest"
        _notice(cfg, "--deterministic-mode: --fp32-matmul-precision auto resolved to highest")


def _notice(cfg: Any, text: str) -> None:
    if text not in cfg.startup_notices:
        cfg.startup_notices.append(text)
