"""Megatron's console line, validation box and timers, throughput/MFU, and the TensorBoard/wandb scalars."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_lite.config import MegatronConfig
from megatron_lite.core.pipeline_parallel.flops_share import stage_flops_share
from megatron_lite.errors import UserError, fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.flops import device_peak_flops, num_floating_point_operations
from megatron_lite.training.log_stats import memory_stats
from megatron_lite.training.scalar_writers import ScalarWriters
from megatron_lite.training.timers import Timers, timers_to_log


def format_log_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    learning_rate: float,
    global_batch_size: int,
    losses: dict[str, float],
    decoupled_learning_rate: float | None = None,
    loss_scale: float,
    grad_norm: float | None,
    skipped_iterations: int,
    nan_iterations: int,
    megatron_tflops_per_gpu: float | None = None,
    tokens_per_second: float | None = None,
    tokens_per_second_per_rank: float | None = None,
    tflops: float | None = None,
    mfu: float | None = None,
    params_norm: float | None = None,
    num_zeros_in_grad: float | None = None,
    timestamp: str | None = None,
) -> str:
    """One console line in Megatron's field order and formats; our throughput fields follow the elapsed time.

    `losses` maps a loss name to its mean over the interval's advanced iterations; as in Megatron a
    loss is shown only when that mean is positive. `tflops` is per rank, like Megatron's per-GPU figure,
    and `mfu` is that over the device's peak (a fraction; printed as a percentage).
    """
    stamp = timestamp if timestamp is not None else time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{stamp}] iteration {iteration:8d}/{train_iters:8d} |",
        f" consumed samples: {consumed_samples:12d} |",
        f" elapsed time per iteration (ms): {elapsed_ms:.1f} |",
    ]
    if megatron_tflops_per_gpu is not None:
        parts.append(f" throughput per GPU (TFLOP/s/GPU): {megatron_tflops_per_gpu:.1f} |")
    if tokens_per_second is not None:
        parts.append(f" tokens per second: {tokens_per_second:.1f} |")
    if tokens_per_second_per_rank is not None:
        parts.append(f" tokens per second per rank: {tokens_per_second_per_rank:.1f} |")
    if tflops is not None:
        # CPUs run at a fraction of a TFLOP/s, where Megatron's one decimal would always print 0.0.
        parts.append(f" TFLOP/s: {tflops:.1f} |" if tflops >= 10 else f" TFLOP/s: {tflops:.3f} |")
    if mfu is not None:
        parts.append(f" MFU: {mfu * 100:.1f}% |")
    parts.append(f" learning rate: {learning_rate:.6E} |")
    if decoupled_learning_rate is not None:
        parts.append(f" decoupled learning rate: {decoupled_learning_rate:.6E} |")
    parts.append(f" global batch size: {global_batch_size:5d} |")
    for name, value in losses.items():
        if value > 0.0:
            parts.append(f" {name}: {value:.6E} |")
    parts.append(f" loss scale: {loss_scale:.1f} |")
    if grad_norm is not None:
        parts.append(f" grad norm: {grad_norm:.3f} |")
    if num_zeros_in_grad is not None:
        parts.append(f" num zeros: {num_zeros_in_grad} |")  # Megatron's float, e.g. "1234.0"
    if params_norm is not None:
        parts.append(f" params norm: {params_norm:.3f} |")
    parts.append(f" number of skipped iterations: {skipped_iterations:3d} |")
    parts.append(f" number of nan iterations: {nan_iterations:3d} |")
    return "".join(parts)


def format_validation_box(where: str, losses: dict[str, float]) -> str:
    """Megatron's evaluation report: the loss and its perplexity (exp capped at e^20) between two dashed rules."""
    text = f" validation loss at {where} | "
    for name, value in losses.items():
        text += f"{name} value: {value:.6E} | {name} PPL: {math.exp(min(20.0, value)):.6E} | "
    rule = "-" * (len(text) + 1)
    return f"{rule}\n{text}\n{rule}"


def _train_dtype(cfg: MegatronConfig) -> torch.dtype:
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    return torch.float32


class TrainingLogger:
    """Accumulates per-iteration results and reports them Megatron's way.

    Only the last rank prints and writes TensorBoard and wandb (Megatron's convention); every rank calls
    the methods, since the timer reports gather over ranks. Elapsed time per iteration is measured between
    console lines with evaluation and checkpoint time taken out (`pause`/`resume`), so throughput reflects
    training alone. `timers` are Megatron's (--timing-log-level), started by the trainer.
    """

    def __init__(
        self,
        cfg: MegatronConfig,
        pstate: ParallelState | None = None,
        *,
        print_fn: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pstate = pstate or ParallelState()
        self.is_logging_rank = self.pstate.is_last_rank
        self._print = print_fn or (lambda text: print(text, flush=True))
        self.writers = ScalarWriters()
        self.timers = Timers(
            cfg.timing_log_level,
            cfg.timing_log_option,
            device=self.pstate.device,
            barrier_with_L1_time=cfg.barrier_with_L1_time,
            print_fn=self.print,
        )
        self.peak_flops: float | None = None
        if self.is_logging_rank:
            self.peak_flops, source = device_peak_flops(
                self.pstate.device, _train_dtype(cfg), cfg.peak_tflops
            )
            self.print(
                f"> MFU is measured against a peak of {self.peak_flops / 1e12:.3f} TFLOP/s per rank ({source})"
            )
        if cfg.tensorboard_dir or cfg.wandb_project:
            self._open_outputs()
        self._reset_interval()
        self._elapsed = 0.0
        self._started_at: float | None = None
        self._decoupled_lr: float | None = None

    # ---- output --------------------------------------------------------------------------------
    def print(self, text: str) -> None:
        """Print from the logging rank only."""
        if self.is_logging_rank:
            self._print(text)

    def _open_outputs(self) -> None:
        """TensorBoard and wandb on the logging rank; a path that cannot be used stops every rank."""
        failure: UserError | None = None
        if self.is_logging_rank:
            try:
                self.writers = ScalarWriters.open(self.cfg, self.print)
            except UserError as err:
                failure = err
        if self.pstate.is_distributed:
            failed = torch.tensor([float(failure is not None)], device=self.pstate.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() > 0 and failure is None:
                fail("the last rank could not open --tensorboard-dir or the wandb directory; see its error")
        if failure is not None:
            raise failure

    @property
    def writer(self):
        """The TensorBoard SummaryWriter, or None."""
        return self.writers.tensorboard

    def _scalar(self, tag: str, value: float, iteration: int, consumed_samples: int | None = None) -> None:
        self.writers.scalar(tag, value, iteration, consumed_samples)

    # ---- timing --------------------------------------------------------------------------------
    def _now(self) -> float:
        if self.pstate.device.type == "cuda":
            torch.cuda.synchronize(self.pstate.device)
        return time.perf_counter()

    def start(self) -> None:
        """Start (or restart) the interval clock."""
        self._started_at = self._now()

    def pause(self) -> None:
        """Stop the clock, e.g. around evaluation or a checkpoint save."""
        if self._started_at is not None:
            self._elapsed += self._now() - self._started_at
            self._started_at = None

    def resume(self) -> None:
        if self._started_at is None:
            self._started_at = self._now()

    def _interval_seconds(self) -> float:
        self.pause()
        seconds, self._elapsed = self._elapsed, 0.0
        self.resume()
        return seconds

    def log_timers(self, names: list[str]) -> str | None:
        """Megatron's report of one-off timers (set-up, evaluate, save-checkpoint) where they happen."""
        return self.timers.log(names)

    # ---- training ------------------------------------------------------------------------------
    def _reset_interval(self) -> None:
        self._loss_sum = 0.0
        self._moe_sums: dict[str, float] = {}
        self._advanced = 0
        self._skipped = 0
        self._nan = 0
        self._iterations = 0

    def training_step(
        self,
        *,
        iteration: int,
        consumed_samples: int,
        learning_rate: float,
        loss: float,
        grad_norm: float | None,
        loss_scale: float,
        skipped: bool,
        params_norm: float | None = None,
        num_zeros_in_grad: float | None = None,
        batch_size: int | None = None,
        moe_losses: dict[str, torch.Tensor] | None = None,
        decoupled_learning_rate: float | None = None,
    ) -> str | None:
        """Record one iteration; on log-interval iterations print the console line and return it.

        `moe_losses`: this step's MoE losses per layer (load_balancing_loss, z_loss, ...); as Megatron, the
        line shows each summed over layers / MoE layers and averaged over the interval, TensorBoard gets
        it every iteration (and per layer as moe/NAME_layer_I with --moe-per-layer-logging).

        `batch_size` is the samples this iteration trained on (Megatron's mbs x DP x micro batches, which
        --rampup-batch-size makes smaller than --global-batch-size at first; default the latter): the
        `batch-size` scalar, the line's `global batch size` and the throughput use it, as in Megatron.
        """
        batch_size = self.cfg.global_batch_size if batch_size is None else batch_size
        # --decoupled-lr: the embedding and output layer's own learning rate, logged beside the other.
        self._decoupled_lr = decoupled_learning_rate
        self._iterations += 1
        if skipped:
            self._skipped += 1
            self._nan += int(not math.isfinite(loss))
        else:
            self._advanced += 1
            self._loss_sum += loss
        cfg = self.cfg
        if moe_losses:
            self._record_moe_losses(iteration, moe_losses)
        if self.writers.active and iteration % cfg.tensorboard_log_interval == 0:
            self._tensorboard_step(
                iteration, consumed_samples, learning_rate, loss, grad_norm, loss_scale, batch_size,
                params_norm, num_zeros_in_grad,
            )  # fmt: skip
        if iteration % cfg.log_interval != 0:
            return None
        return self._log_interval(
            iteration, consumed_samples, learning_rate, grad_norm, loss_scale, batch_size, params_norm,
            num_zeros_in_grad,
        )  # fmt: skip

    def _record_moe_losses(self, iteration: int, moe_losses: dict[str, torch.Tensor]) -> None:
        from megatron_lite.core.transformer.moe.training import num_moe_layers

        layers = num_moe_layers(self.cfg)
        for name, per_layer in moe_losses.items():
            value = float(per_layer.sum()) / layers
            self._moe_sums[name] = self._moe_sums.get(name, 0.0) + value
            if self.writers.active:
                self._scalar(name, value, iteration)
                if self.cfg.moe_per_layer_logging:
                    for i, layer_value in enumerate(per_layer.tolist()):
                        self._scalar(f"moe/{name}_layer_{i}", layer_value, iteration)

    def _tensorboard_step(
        self,
        iteration: int,
        consumed: int,
        learning_rate: float,
        loss: float,
        grad_norm: float | None,
        loss_scale: float,
        batch_size: int,
        params_norm: float | None,
        num_zeros_in_grad: float | None,
    ) -> None:
        """Megatron's per-iteration scalars, each switched by its flag as in training_log."""
        cfg = self.cfg
        self.writers.wandb_only({"samples vs steps": consumed}, iteration)
        self._scalar("learning-rate", learning_rate, iteration, consumed)
        if self._decoupled_lr is not None:
            self._scalar("decoupled-learning-rate", self._decoupled_lr, iteration)
        self._scalar("batch-size", batch_size, iteration, consumed)
        # The iteration's loss even when the step was skipped (Megatron's loss_dict has it either way).
        self._scalar("lm loss", loss, iteration, consumed)
        if cfg.log_loss_scale_to_tensorboard:
            self._scalar("loss-scale", loss_scale, iteration, consumed)
        if cfg.log_world_size_to_tensorboard:
            self._scalar("world-size", self.pstate.world_size, iteration, consumed)
        if grad_norm is not None and math.isfinite(grad_norm):
            self._scalar("grad-norm", grad_norm, iteration, consumed)
        if num_zeros_in_grad is not None:
            self._scalar("num-zeros", num_zeros_in_grad, iteration, consumed)
        if params_norm is not None:
            self._scalar("params-norm", params_norm, iteration, consumed)
        if cfg.log_memory_to_tensorboard:  # TensorBoard only, as in Megatron
            for tag, value in memory_stats(self.pstate.device).items():
                self.writers.tensorboard_only(tag, value, iteration)

    def _log_interval(
        self,
        iteration: int,
        consumed_samples: int,
        learning_rate: float,
        grad_norm: float | None,
        loss_scale: float,
        batch_size: int,
        params_norm: float | None,
        num_zeros_in_grad: float | None,
    ) -> str | None:
        cfg, world = self.cfg, self.pstate.world_size
        seconds = self._interval_seconds()
        iterations = max(1, self._iterations)
        per_iteration = seconds / iterations
        tokens_per_second = batch_size * cfg.seq_length / per_iteration if per_iteration > 0 else 0.0
        flops = num_floating_point_operations(cfg, batch_size)
        flops_per_rank = flops / per_iteration / world if per_iteration > 0 else 0.0
        # TFLOP/s and MFU of this (logging) rank: under pipeline parallelism, the FLOPs of its own stage.
        stage_share = stage_flops_share(cfg, flops, batch_size, self.pstate.pp_rank)
        stage_flops_per_rank = flops_per_rank * stage_share * self.pstate.pp_size
        mean_loss = self._loss_sum / max(1, self._advanced)
        line = None
        if self.is_logging_rank:
            if cfg.log_timers_to_tensorboard:
                self._scalar("iteration-time", per_iteration, iteration)
            line = format_log_line(
                iteration=iteration,
                train_iters=cfg.train_iters,
                consumed_samples=consumed_samples,
                elapsed_ms=per_iteration * 1000.0,
                learning_rate=learning_rate,
                decoupled_learning_rate=self._decoupled_lr,
                global_batch_size=batch_size,
                losses={
                    "lm loss": mean_loss,
                    **{name: total / max(1, self._advanced) for name, total in self._moe_sums.items()},
                },
                loss_scale=loss_scale,
                grad_norm=grad_norm,
                skipped_iterations=self._skipped,
                nan_iterations=self._nan,
                megatron_tflops_per_gpu=flops_per_rank / 1e12 if cfg.log_throughput else None,
                tokens_per_second=tokens_per_second,
                tokens_per_second_per_rank=tokens_per_second / world if world > 1 else None,
                tflops=stage_flops_per_rank / 1e12,
                mfu=stage_flops_per_rank / self.peak_flops if self.peak_flops else None,
                params_norm=params_norm,
                num_zeros_in_grad=num_zeros_in_grad,
            )
            if cfg.log_throughput and cfg.log_timers_to_tensorboard:
                self._scalar("throughput", flops_per_rank / 1e12, iteration)
            self._print(line)
        # Per iteration of this interval (Megatron divides by --log-interval, the same number except in
        # the first interval after a resume). Both are collectives: every rank takes part.
        names = timers_to_log(cfg.timing_log_level)
        if cfg.log_timers_to_tensorboard:
            for tag, value in self.timers.max_times(names, normalizer=iterations).items():
                self._scalar(tag, value, iteration)
        self.timers.log(names, normalizer=iterations)
        self._reset_interval()
        return line

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluation(
        self, where: str, loss: float, iteration: int, consumed_samples: int, write: bool = True
    ) -> str | None:
        """Print the dashed box for an evaluation and (with `write`) the scalar `lm loss validation`, plus
        its ppl with --log-validation-ppl-to-tensorboard (TensorBoard only).

        As in Megatron the tags are the same for the validation and the test set (the box says which), and
        the evaluations after --skip-train write nothing.
        """
        if not self.is_logging_rank:
            return None
        box = format_validation_box(where, {"lm loss": loss})
        self._print(box)
        if write:
            self._scalar("lm loss validation", loss, iteration, consumed_samples)
            if self.cfg.log_validation_ppl_to_tensorboard:
                ppl = math.exp(min(20.0, loss))
                self.writers.tensorboard_only("lm loss validation ppl", ppl, iteration, consumed_samples)
        return box

    def close(self) -> None:
        self.writers.close()
