"""The pretraining loop: build everything from the config, train with gradient accumulation, evaluate, save, exit cleanly."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.arguments.report import startup_lines
from megatron_lite.config import MegatronConfig
from megatron_lite.core.context_parallel import apply_context_parallel, split_batch_for_cp
from megatron_lite.core.datasets.builder import build_train_valid_test_datasets
from megatron_lite.core.performance import configure_matmul_precision
from megatron_lite.core.pipeline_parallel.checkpoint_view import checkpoint_module
from megatron_lite.core.pipeline_parallel.schedule import PipelineSchedule
from megatron_lite.core.pipeline_parallel.stage import build_model_chunks
from megatron_lite.core.transformer.moe.training import MoETrainingHooks
from megatron_lite.errors import UserError, fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tokenizer import Tokenizer
from megatron_lite.training.data_samplers import build_mock_datasets, build_pretraining_data_loader
from megatron_lite.training.evaluation import TrainerEvaluation
from megatron_lite.training.fault_tolerance import ExitSignal, collective_failures_as_errors
from megatron_lite.training.grad_utils import (
    LossScaler,
    params_norm,
)
from megatron_lite.training.logger import TrainingLogger
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.microbatches import build_num_microbatches_calculator, train_num_samples
from megatron_lite.training.optimizer import build_optimizer, finish_param_sync
from megatron_lite.training.profiling import Profiler
from megatron_lite.training.runtime import (
    manual_gc_after_iteration,
    manual_gc_start,
    run_switches,
)
from megatron_lite.training.setup import (  # noqa: F401 - set_random_seed, check_precision: public names here too
    check_precision,
    gpt_model_provider,
    set_random_seed,
    setup_config,
    train_dtype,
)
from megatron_lite.training.train_step import TrainerStep
from megatron_lite.training.trainer_checkpoints import TrainerCheckpoints

ModelProvider = Callable[[MegatronConfig, ParallelState], torch.nn.Module]
Batch = dict[str, torch.Tensor]


class NonFiniteTrainingError(UserError):
    """Too many iterations in a row had a non-finite loss or gradient; the run stops without saving."""


@dataclass
class TrainResult:
    """What a run did, for callers and tests: the loss of every iteration and the evaluations."""

    iteration: int = 0
    consumed_train_samples: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    grad_norms: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    last_validation_loss: float | None = None
    test_loss: float | None = None
    skipped_iterations: int = 0
    exit_reason: str = "finished"  # finished | exit-interval | exit-duration | signal
    log_lines: list[str] = field(default_factory=list)


def pretrain(
    cfg: MegatronConfig,
    pstate: ParallelState | None = None,
    *,
    model_provider: ModelProvider | None = None,
) -> TrainResult:
    """Train a GPT as the config says, on this process's place in the (dp, tp) grid.

    `model_provider(cfg, pstate)` builds the model (default: GPTModel); it must take the GPTModel
    forward arguments and return the per-token loss [b, s] when given labels.
    """
    pstate = pstate or ParallelState()
    # --deterministic-mode before anything runs a GEMM; torch's global state is restored afterwards.
    with run_switches(cfg):
        return _pretrain(cfg, pstate, model_provider)


def _pretrain(
    cfg: MegatronConfig, pstate: ParallelState, model_provider: ModelProvider | None
) -> TrainResult:
    start_time = time.monotonic()
    tokenizer = setup_config(cfg, pstate)
    set_random_seed(cfg.seed, pstate)
    # Before the logger: its MFU peak is measured on the matmul path chosen here.
    matmul_path = configure_matmul_precision(
        pstate.device, cfg.fp32_matmul_precision, group=dist.group.WORLD if pstate.is_distributed else None
    )
    if pstate.rank == 0:
        # Megatron's arguments block, then one line per Megatron-only flag saying what it maps to here.
        print("\n".join(startup_lines(cfg)), flush=True)
    logger = TrainingLogger(cfg, pstate)
    logger.print(f"> {matmul_path}")
    exit_signal = ExitSignal.from_config(cfg)
    timers = logger.timers
    try:
        # A rank that dies or stalls makes the others' next collective fail (at the latest after
        # --distributed-timeout-minutes): one line and a non-zero exit, which torchrun restarts from.
        with collective_failures_as_errors(pstate, cfg.distributed_timeout_minutes):
            timers("model-and-optimizer-setup", log_level=0).start(barrier=True)
            trainer = Trainer(cfg, pstate, logger, model_provider or gpt_model_provider)
            trainer.load()
            timers("model-and-optimizer-setup").stop()
            timers("train/valid/test-data-iterators-setup", log_level=0).start(barrier=True)
            trainer.build_data(tokenizer)
            timers("train/valid/test-data-iterators-setup").stop()
            logger.log_timers(["model-and-optimizer-setup", "train/valid/test-data-iterators-setup"])
            exit_signal.install()
            return trainer.run(exit_signal, start_time)
    finally:
        if cfg.async_save:
            from megatron_lite.training.checkpointing import abandon_async_save

            # After a failure: a background write never published is left for the next save to remove.
            abandon_async_save(wait=False)
        exit_signal.restore()
        logger.close()


# ---- the trainer ------------------------------------------------------------------------------------
class Trainer(TrainerStep, TrainerCheckpoints, TrainerEvaluation):
    """Owns the model, optimizer, schedule, data iterators and progress counters of one run."""

    def __init__(
        self,
        cfg: MegatronConfig,
        pstate: ParallelState,
        logger: TrainingLogger,
        model_provider: ModelProvider,
    ) -> None:
        self.cfg = cfg
        self.pstate = pstate
        self.logger = logger
        # Under pipeline parallelism: this rank's model chunks and the schedule that runs them (no DDP:
        # the gradients are all-reduced after the schedule, as without --overlap-grad-reduce).
        self.pipeline: PipelineSchedule | None = None
        if pstate.pp_size > 1:
            chunks = [c.to(pstate.device) for c in build_model_chunks(cfg, pstate, model_provider)]
            self.chunks = chunks
            self.module = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)
            self.pipeline = PipelineSchedule(
                chunks,
                pstate,
                micro_batch_size=cfg.micro_batch_size,
                seq_length=cfg.seq_length // cfg.context_parallel_size,  # this CP rank's positions
            )
        else:
            self.module = model_provider(cfg, pstate).to(pstate.device)
            self.chunks = [self.module]
        apply_context_parallel(
            self.module, pstate.cp_group if pstate.cp_size > 1 else None, cfg.cp_comm_type[0]
        )
        # What checkpoints see: the whole model's names (global layer numbers) for this rank's parameters.
        self.checkpoint_module = checkpoint_module(self.chunks) if self.pipeline is not None else self.module
        num_params = sum(p.numel() for p in self.module.parameters())
        logger.print(
            "> number of parameters on (tensor, pipeline) model parallel rank "
            f"({pstate.tp_rank}, {pstate.pp_rank}): {num_params}"
        )
        forward_module = torch.compile(self.module) if cfg.compile and self.pipeline is None else self.module
        self.ddp: DistributedDataParallel | None = None
        # Mixture of experts: expert gradients and router state bypass DDP (None without --num-experts).
        self.moe = MoETrainingHooks.build(cfg, pstate, self.module)
        self.moe_losses: dict[str, torch.Tensor] | None = None
        if pstate.grad_size > 1 and self.pipeline is None:
            if self.moe is not None:
                self.moe.ignore_in_ddp(forward_module)
            self.ddp = DistributedDataParallel(
                forward_module,
                process_group=pstate.grad_group,  # DP, or DP x CP: same weights, different tokens
                device_ids=[pstate.device.index] if pstate.device.type == "cuda" else None,
            )
        self.model = self.ddp if self.ddp is not None else forward_module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.module, cfg, pstate)
        self.scheduler = OptimizerParamScheduler.from_config(self.optimizer, cfg)
        # Micro batches per step: constant, or growing with the consumed samples (--rampup-batch-size).
        self.microbatches = build_num_microbatches_calculator(cfg)
        self.scaler = LossScaler.from_config(cfg)
        self.autocast_dtype = train_dtype(cfg)
        self.iteration = 0
        self.consumed_train_samples = 0
        self.skipped_iterations = 0
        self.last_saved_iteration: int | None = None
        self.result = TrainResult()
        self.train_iter: Iterator[Batch] | None = None
        self.valid_iter: Iterator[Batch] | None = None
        self.test_dataset = None

    # ---- data ------------------------------------------------------------------------------------
    def build_data(self, tokenizer: Tokenizer | None) -> None:
        """Datasets sized as Megatron sizes them, and loaders that continue at the consumed-sample counts."""
        cfg, pstate = self.cfg, self.pstate
        gbs = cfg.global_batch_size
        num_samples = (
            train_num_samples(cfg),  # a step batch schedule's steps are larger than --global-batch-size
            (cfg.train_iters // cfg.eval_interval + 1) * cfg.eval_iters * gbs,
            cfg.eval_iters * gbs,
        )
        if cfg.mock_data:
            train_ds, valid_ds, test_ds = build_mock_datasets(
                cfg, num_samples, tokenizer.eod if tokenizer is not None else None
            )
        else:
            barrier = (lambda: dist.barrier()) if pstate.is_distributed else None
            train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
                cfg, tokenizer, num_samples, is_builder=pstate.rank == 0, barrier=barrier
            )
        consumed_valid = (self.iteration // cfg.eval_interval) * cfg.eval_iters * gbs
        self.train_iter = self._iterate(train_ds, self.consumed_train_samples)
        if valid_ds is not None and consumed_valid < len(valid_ds):
            self.valid_iter = self._iterate(valid_ds, consumed_valid)
        self.test_dataset = test_ds

    def _iterate(self, dataset, consumed: int) -> Iterator[Batch] | None:
        loader = build_pretraining_data_loader(dataset, consumed, self.cfg, self.pstate)
        return iter(loader) if loader is not None else None

    def _next_micro_batches(
        self, data_iter: Iterator[Batch], what: str, count: int | None = None
    ) -> list[Batch]:
        """`count` micro batches (default: those of a full global batch)."""
        batches = []
        for _ in range(self.cfg.num_microbatches if count is None else count):
            try:
                batch = next(data_iter)
            except StopIteration:
                fail(
                    f"the {what} data ran out at iteration {self.iteration}; the dataset is smaller than requested"
                )
            batch = {k: v.to(self.pstate.device, non_blocking=True) for k, v in batch.items()}
            # Context parallelism: this rank's 2 of the 2C chunks of each sequence (global positions kept).
            batches.append(split_batch_for_cp(batch, self.pstate.cp_size, self.pstate.cp_rank))
        return batches

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, exit_signal: ExitSignal, start_time: float) -> TrainResult:
        """Train to --train-iters (or an exit condition), then evaluate on the validation and test sets."""
        cfg = self.cfg
        if not cfg.skip_train:
            profiler = Profiler(cfg, self.pstate.rank, self.pstate.device)
            if profiler.notice() is not None:
                self.logger.print(f"> {profiler.notice()}")
            try:
                reason = self.train(exit_signal, start_time, profiler)
            finally:
                profiler.close()
            if reason is not None:
                self.result.exit_reason = reason
                return self._finish()
            if self.iteration > 0:
                self.save()
            self.finalize_async_save(blocking=True)  # the last checkpoint is published before evaluation
        where = f"iteration {self.iteration}"
        loss = self._evaluate_and_report(self.valid_iter, f"{where} on validation set")
        if loss is not None:
            self.result.validation_losses.append((self.iteration, loss))
        if self.test_dataset is not None and cfg.eval_iters > 0:
            self.result.test_loss = self._evaluate_and_report(
                self._iterate(self.test_dataset, 0), f"{where} on test set"
            )
        return self._finish()

    def train(
        self, exit_signal: ExitSignal, start_time: float, profiler: Profiler | None = None
    ) -> str | None:
        """The iteration loop; returns why it stopped early (after saving), or None at --train-iters."""
        cfg = self.cfg
        consecutive_skips = 0
        manual_gc_start(cfg)
        self.logger.start()
        while self.iteration < cfg.train_iters:
            self.finalize_async_save(blocking=False)
            if profiler is not None:
                profiler.step(self.iteration)
            # Megatron sets the step's micro batches from the samples consumed so far (batch ramp-up).
            self.microbatches.update(self.consumed_train_samples, consistency_check=True)
            self.logger.timers("batch-generator", log_level=2).start()
            batches = self._next_micro_batches(self.train_iter, "training", self.microbatches.get())
            self.logger.timers("batch-generator").stop()
            loss, grad_norm, skipped = self.train_step(batches)
            self.iteration += 1
            if profiler is not None:
                profiler.after(self.iteration)
            self.consumed_train_samples += self.microbatches.get_current_running_global_batch_size()
            self.result.losses.append((self.iteration, loss))
            self.result.grad_norms.append((self.iteration, grad_norm))
            self.skipped_iterations += int(skipped)
            # With dynamic fp16 scaling an overflow is normal until the scale has come down.
            if skipped and (not math.isfinite(loss) or self.scaler.at_minimum):
                consecutive_skips += 1
            elif not skipped:
                consecutive_skips = 0
            line = self.logger.training_step(
                iteration=self.iteration,
                consumed_samples=self.consumed_train_samples,
                learning_rate=self.scheduler.get_lr(),
                loss=loss,
                grad_norm=grad_norm,
                loss_scale=self.scaler.scale,
                skipped=skipped,
                params_norm=self._params_norm_if_logged(),
                num_zeros_in_grad=self.num_zeros_in_grad,
                moe_losses=self.moe_losses,
                batch_size=self.microbatches.get_current_running_global_batch_size(),
                decoupled_learning_rate=self._decoupled_lr(),
            )
            if line is not None:
                self.result.log_lines.append(line)
            manual_gc_after_iteration(cfg, self.iteration)
            if consecutive_skips >= cfg.max_consecutive_skipped_iterations:
                self._stop_non_finite(consecutive_skips)
            if self.iteration % cfg.eval_interval == 0:
                loss = self._evaluate_and_report(
                    self.valid_iter, f"iteration {self.iteration}", periodic=True
                )
                if loss is not None:
                    self.result.validation_losses.append((self.iteration, loss))
            # Not inside a run of non-finite iterations: the last good checkpoint must stay the latest.
            if cfg.save_interval and self.iteration % cfg.save_interval == 0 and consecutive_skips == 0:
                self.save()
            reason = self._exit_reason(exit_signal, start_time)
            if reason is not None:
                self.logger.print(f"exiting at iteration {self.iteration} ({reason})")
                self.save()
                return reason
        finish_param_sync(self.optimizer)
        return None

    def _finish(self) -> TrainResult:
        self.finalize_async_save(blocking=True)  # before exit (exit interval, duration, signal)
        result = self.result
        result.iteration = self.iteration
        result.consumed_train_samples = self.consumed_train_samples
        result.skipped_iterations = self.skipped_iterations
        if result.validation_losses:
            result.last_validation_loss = result.validation_losses[-1][1]
        return result

    def _params_norm_if_logged(self) -> float | None:
        """--log-params-norm: Megatron computes it every iteration; here only where the log line or a
        scalar writer takes it (the same decision on every rank: the norm is a collective)."""
        cfg = self.cfg
        scalars = (
            cfg.tensorboard_dir or cfg.wandb_project
        ) and self.iteration % cfg.tensorboard_log_interval == 0
        if cfg.log_params_norm and (self.iteration % cfg.log_interval == 0 or scalars):
            finish_param_sync(self.optimizer)
            return params_norm(self.module.parameters(), self.pstate)
        return None

    def _exit_reason(self, exit_signal: ExitSignal, start_time: float) -> str | None:
        """Why to stop after this iteration, agreed by every rank (a signal may reach only some of them)."""
        cfg = self.cfg
        flags = torch.tensor(
            [
                float(exit_signal.received is not None),
                float(
                    cfg.exit_duration_in_mins is not None
                    and (time.monotonic() - start_time) / 60.0 > cfg.exit_duration_in_mins
                ),
            ]
        )
        if self.pstate.is_distributed:
            # gloo reduces CPU tensors; NCCL needs them on the GPU.
            flags = flags.to(self.pstate.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "signal"
        if flags[1] > 0:
            return "exit-duration"
        if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
            return "exit-interval"
        return None

    def _stop_non_finite(self, count: int) -> None:
        self.finalize_async_save(blocking=True)  # the last good checkpoint must be published to be named
        where = (
            f"; the last good checkpoint is iteration {self.last_saved_iteration} in {self.cfg.save}"
            if self.cfg.save and self.last_saved_iteration is not None
            else ""
        )
        raise NonFiniteTrainingError(
            f"stopping at iteration {self.iteration}: {count} iterations in a row had a non-finite loss or "
            f"gradient (--max-consecutive-skipped-iterations {self.cfg.max_consecutive_skipped_iterations}); "
            f"they did not update the model and no checkpoint was written after them{where}. "
            "Try a lower --lr, --bf16 instead of --fp16, or check the data"
        )
