"""The pretraining loop: build everything from the config, train with gradient accumulation, evaluate, save, exit cleanly."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.arguments.report import startup_lines
from megatron_lite.config import MegatronConfig
from megatron_lite.core.context_parallel import apply_context_parallel, split_batch_for_cp
from megatron_lite.core.datasets.builder import build_train_valid_test_datasets
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.performance import configure_matmul_precision
from megatron_lite.core.pipeline_parallel.checkpoint_view import checkpoint_module
from megatron_lite.core.pipeline_parallel.embedding_group import all_reduce_embedding_grads
from megatron_lite.core.pipeline_parallel.schedule import PipelineSchedule
from megatron_lite.core.pipeline_parallel.stage import build_model_chunks
from megatron_lite.core.tensor_parallel import model_parallel_manual_seed
from megatron_lite.core.transformer.moe.training import MoETrainingHooks
from megatron_lite.errors import UserError, fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer
from megatron_lite.training.data_samplers import build_mock_datasets, build_pretraining_data_loader
from megatron_lite.training.fault_tolerance import ExitSignal, collective_failures_as_errors
from megatron_lite.training.grad_utils import (
    LossScaler,
    all_reduce_gradients,
    clip_grad_norm,
    micro_batch_loss_weights,
    params_norm,
)
from megatron_lite.training.log_stats import count_zeros_in_grad
from megatron_lite.training.logger import TrainingLogger
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.microbatches import build_num_microbatches_calculator, train_num_samples
from megatron_lite.training.optimizer import build_optimizer, finish_param_sync
from megatron_lite.training.profiling import Profiler
from megatron_lite.training.runtime import (
    manual_gc_after_evaluation,
    manual_gc_after_iteration,
    manual_gc_before_evaluation,
    manual_gc_start,
    run_switches,
)

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
            trainer = Trainer(cfg, pstate, logger, model_provider or _gpt_model_provider)
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


# ---- setup ------------------------------------------------------------------------------------------
def setup_config(cfg: MegatronConfig, pstate: ParallelState) -> Tokenizer | None:
    """Build the tokenizer, finalize the config for this world and vocabulary, and check the device."""
    if cfg.use_checkpoint_args and cfg.load:
        # Before the tokenizer: the checkpoint's args may name it (Megatron's load_args_from_checkpoint).
        from megatron_lite.training.checkpointing.checkpoint_args import apply_checkpoint_args

        for line in apply_checkpoint_args(cfg):
            if pstate.rank == 0:
                print(line, flush=True)
    tokenizer = None
    if cfg.tokenizer_type is not None or cfg.vocab_file is not None or cfg.merge_file is not None:
        # All the tokenizer settings (--tokenizer-model, --vocab-size, --tiktoken-*); BPE files without a
        # type mean GPT-2 BPE, as in Megatron's GPT examples.
        tokenizer = build_tokenizer(cfg)
    elif not cfg.mock_data:
        fail(
            "--tokenizer-type is required with --data-path: the one the data was preprocessed with "
            f"({', '.join(TOKENIZER_TYPES)})"
        )
    elif cfg.vocab_size is None:
        fail("--mock-data without --tokenizer-type needs --vocab-size, e.g. --vocab-size 50257")
    cfg.finalize(pstate.world_size, tokenizer.vocab_size if tokenizer is not None else None)
    if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
        fail(
            f"--vocab-size {cfg.vocab_size} is smaller than the {tokenizer.name} vocabulary "
            f"({tokenizer.vocab_size}); leave --vocab-size out to use the tokenizer's"
        )
    if cfg.tensor_model_parallel_size != pstate.tp_size:
        fail(
            f"--tensor-model-parallel-size {cfg.tensor_model_parallel_size} does not match the process "
            f"groups (TP size {pstate.tp_size}); pass the same value to initialize_parallel"
        )
    if cfg.pipeline_model_parallel_size != pstate.pp_size:
        fail(
            f"--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size} does not match the process "
            f"groups (PP size {pstate.pp_size}); pass the same value to initialize_parallel"
        )
    if cfg.context_parallel_size != pstate.cp_size:
        fail(
            f"--context-parallel-size {cfg.context_parallel_size} does not match the process "
            f"groups (CP size {pstate.cp_size}); pass the same value to initialize_parallel"
        )
    check_precision(cfg, pstate.device)
    return tokenizer


def check_precision(cfg: MegatronConfig, device: torch.device) -> None:
    """Precision settings the device cannot run. fp16 with dynamic loss scaling runs on CPUs too (torch's CPU
    autocast has float16): slower than bf16 there, but Megatron's fp16 command lines run unchanged."""


def set_random_seed(seed: int, pstate: ParallelState | None = None) -> None:
    """Seed python, numpy and torch with --seed, and the model's RNG tracker streams for this TP rank.

    As Megatron, each pipeline stage offsets the seed by 100 x its rank (its dropout masks differ).
    """
    if pstate is not None:
        seed += 100 * pstate.pp_rank
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed, pstate.tp_rank if pstate is not None else 0)


def _gpt_model_provider(cfg: MegatronConfig, pstate: ParallelState, **stage) -> torch.nn.Module:
    """The whole GPTModel, or under pipeline parallelism one stage of it (pre_process, post_process,
    layers: Megatron's model_provider arguments)."""
    return GPTModel(cfg, pstate, **stage)


def _train_dtype(cfg: MegatronConfig) -> torch.dtype | None:
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    return None


# ---- the trainer ------------------------------------------------------------------------------------
class Trainer:
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
                chunks, pstate, micro_batch_size=cfg.micro_batch_size, seq_length=cfg.seq_length
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
        self.autocast_dtype = _train_dtype(cfg)
        self.iteration = 0
        self.consumed_train_samples = 0
        self.skipped_iterations = 0
        self.last_saved_iteration: int | None = None
        self.result = TrainResult()
        self.train_iter: Iterator[Batch] | None = None
        self.valid_iter: Iterator[Batch] | None = None
        self.test_dataset = None

    # ---- checkpoints -----------------------------------------------------------------------------
    def load(self) -> None:
        """Resume from --load when it holds a checkpoint (weights, optimizer, schedule, RNG, progress)."""
        if not self.cfg.load:
            return
        # Imported on use: torch.distributed.checkpoint adds seconds to start-up, needed only with --load/--save.
        from megatron_lite.training.checkpointing import load_checkpoint

        timers = self.logger.timers
        timers("load-checkpoint", log_level=0).start(barrier=True)
        progress = load_checkpoint(
            self.cfg.load, self.checkpoint_module, self.optimizer, self.scheduler, self.cfg, self.pstate
        )
        timers("load-checkpoint").stop(barrier=True)
        self.logger.log_timers(["load-checkpoint"])
        if progress is None:
            return
        self.iteration = progress.iteration
        self.consumed_train_samples = progress.consumed_train_samples
        self.skipped_iterations = progress.skipped_iterations
        self.last_saved_iteration = progress.iteration
        scaler_state = (progress.extra_state or {}).get("loss_scaler")
        if scaler_state and self.cfg.fp16 and not self.cfg.finetune and not self.cfg.no_load_optim:
            self.scaler.load_state_dict(scaler_state)
        self.logger.print(
            f"> resuming from {self.cfg.load} at iteration {self.iteration}, "
            f"{self.consumed_train_samples} consumed samples"
        )

    def save(self) -> None:
        if not self.cfg.save or self.last_saved_iteration == self.iteration:
            return
        from megatron_lite.training.checkpointing import save_checkpoint

        finish_param_sync(self.optimizer)  # an --overlap-param-gather gather must land before saving
        self.logger.pause()
        self.logger.timers("save-checkpoint", log_level=0).start(barrier=False)
        save_checkpoint(
            self.cfg.save,
            self.iteration,
            self.checkpoint_module,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.pstate,
            consumed_train_samples=self.consumed_train_samples,
            extra_state={
                "loss_scaler": self.scaler.state_dict(),
                "skipped_iterations": self.skipped_iterations,
            },
        )
        self.last_saved_iteration = self.iteration
        self.logger.timers("save-checkpoint").stop(barrier=False)
        if self.cfg.async_save:
            self.logger.print(
                f"  scheduled an async checkpoint save at iteration {self.iteration:7d} to {self.cfg.save}"
            )
        else:
            self.logger.print(f"  saved checkpoint at iteration {self.iteration:7d} to {self.cfg.save}")
        self.logger.log_timers(["save-checkpoint"])
        self.logger.resume()

    def finalize_async_save(self, *, blocking: bool) -> None:
        """Publish a checkpoint that --async-save wrote in the background, once every rank has written it
        (collective; blocking: wait for the writes)."""
        if not self.cfg.async_save:
            return
        from megatron_lite.training.checkpointing import finalize_async_save

        published = finalize_async_save(self.pstate, blocking=blocking)
        if published is not None:
            self.logger.print(
                f"  successfully saved checkpoint from iteration {published:7d} to {self.cfg.save}"
            )

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

    # ---- one step --------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.pstate.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def _loss_func(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Megatron's loss_func: the summed per-token loss [b, s] over the non-masked tokens. The pipeline
        schedule applies it on the last stage."""
        return (per_token.float() * loss_mask.float()).sum()

    def _decoupled_lr(self) -> float | None:
        """--decoupled-lr's current value (the embedding and output layer's groups), else None."""
        for group in self.optimizer.param_groups:
            if group.get("is_decoupled_lr"):
                return group["lr"]  # as Megatron's training_log reads it
        return None

    def _attention_mask(self, batch: Batch) -> torch.Tensor | None:
        # The data loader's mask (Megatron's create_attention_mask) is plain causal unless documents are
        # separated (--reset-attention-mask); the model is causal itself, and an explicit mask would
        # only move attention off its fast is_causal path.
        return batch.get("attention_mask") if self.cfg.reset_attention_mask else None

    def _micro_batch_loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The micro batch's summed loss (_loss_func) through the whole model."""
        with self._autocast():
            per_token = model(
                batch["tokens"],
                position_ids=batch.get("position_ids"),
                attention_mask=self._attention_mask(batch),
                labels=batch["labels"],
            )  # [b, s]
        return self._loss_func(per_token, batch["loss_mask"])

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks that hold other tokens of the global batch (DP, and CP)."""
        if self.pstate.grad_size > 1:
            dist.all_reduce(value, group=self.pstate.grad_group)
        return value

    def _grad_sync(self, last: bool):
        """DDP all-reduces buckets during the last micro batch's backward with --overlap-grad-reduce;
        without it every backward runs unsynchronised and all_reduce_gradients follows."""
        if self.ddp is None or (last and self.cfg.overlap_grad_reduce):
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def train_step(self, batches: list[Batch]) -> tuple[float, float, bool]:
        """Forward/backward over the micro batches, clip, and step unless the loss or gradient is not finite.

        Returns (lm loss: summed over the global batch's tokens / its token count, as Megatron logs it;
        grad norm; skipped).
        """
        cfg = self.cfg
        n = len(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = torch.stack([b["loss_mask"].float().sum() for b in batches])
        weights = micro_batch_loss_weights(num_tokens, cfg.calculate_per_token_loss, self.pstate)
        loss_sum = torch.zeros((), device=self.pstate.device)
        timers = self.logger.timers  # Megatron's, by --timing-log-level (level 1 and 2 ones here)
        timers("forward-backward", log_level=1).start()
        if self.moe is not None:
            # The aux losses' gradient factor: the lm loss's per micro batch (the same for all of them).
            # Megatron: loss scale / micro batches; with --calculate-per-token-loss the global-token factor.
            factor = float(weights[0]) if cfg.calculate_per_token_loss else 1.0 / n
            self.moe.before_backward(factor * self.scaler.scale)
        if self.pipeline is not None:
            scaled = [weights[i] * self.scaler.scale for i in range(n)]
            loss_sum = self.pipeline.forward_backward(batches, self._loss_func, scaled, self._autocast)
        else:
            for i, batch in enumerate(batches):
                with self._grad_sync(last=i == n - 1):
                    timers("forward-compute", log_level=2).start()
                    loss = self._micro_batch_loss_sum(self.model, batch)
                    timers("forward-compute").stop()
                    timers("backward-compute", log_level=2).start()
                    (loss * (weights[i] * self.scaler.scale)).backward()
                    timers("backward-compute").stop()
                loss_sum += loss.detach()
        if (self.ddp is not None and not cfg.overlap_grad_reduce) or (
            self.pipeline is not None and self.pstate.grad_size > 1
        ):
            timers("all-grads-sync", log_level=1).start()
            all_reduce_gradients([p for p in self.params if not getattr(p, "is_expert", False)], self.pstate)
            timers("all-grads-sync").stop()
        if self.pipeline is not None:
            all_reduce_embedding_grads(self.chunks, self.pstate)
        if self.moe is not None:
            self.moe.after_backward()
        timers("forward-backward").stop()
        totals = self._dp_sum(torch.stack([loss_sum, num_tokens.sum()]))
        if self.pipeline is not None:
            totals = self.pipeline.broadcast_from_last_stage(totals)  # only the last stage has the loss
        lm_loss = (totals[0] / totals[1]).item()
        # Under --sequence-parallel the model's autograd already sums the replicated norms' and biases'
        # partial gradients over the TP group, so the gradients are complete here.
        timers("optimizer", log_level=1).start()
        self.scaler.unscale_(self.params)
        timers("optimizer-clip-main-grad", log_level=1).start()
        grad_norm = clip_grad_norm(self.params, cfg.clip_grad, self.pstate)
        timers("optimizer-clip-main-grad").stop()
        skipped = not (math.isfinite(grad_norm) and math.isfinite(lm_loss))
        self.num_zeros_in_grad: float | None = None  # Megatron has none for a skipped step
        if not skipped:
            timers("optimizer-count-zeros", log_level=1).start()
            if cfg.log_num_zeros_in_grad:
                self.num_zeros_in_grad = count_zeros_in_grad(self.params, self.pstate)
            timers("optimizer-count-zeros").stop()
            timers("optimizer-inner-step", log_level=1).start()
            self.optimizer.step()
            timers("optimizer-inner-step").stop()
            # Megatron's increment: the samples this step trained on (its micro batches x mbs x DP).
            self.scheduler.step(n * cfg.micro_batch_size * self.pstate.dp_size)
        self.scaler.update(found_inf=skipped)
        if self.moe is not None:
            self.moe_losses = self.moe.after_step(n)
        timers("optimizer").stop()
        return lm_loss, grad_norm, skipped

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data_iter: Iterator[Batch]) -> float | None:
        """lm loss over --eval-iters global batches: summed over their tokens on all DP ranks / the token count."""
        self.model.eval()
        totals = torch.zeros(2, device=self.pstate.device)  # (summed loss, tokens), as Megatron's evaluate
        count = 0
        for _ in range(self.cfg.eval_iters):
            batches = self._next_micro_batches(data_iter, "validation")
            if self.pipeline is not None and batches:
                totals[0] += self.pipeline.forward_only(batches, self._loss_func, self._autocast)
            for batch in batches:
                if self.pipeline is None:
                    totals[0] += self._micro_batch_loss_sum(self.model, batch)
                totals[1] += batch["loss_mask"].float().sum()
                count += 1
        self.model.train()
        if count == 0:
            return None
        totals = self._dp_sum(totals)
        if self.pipeline is not None:
            totals = self.pipeline.broadcast_from_last_stage(totals)
        return (totals[0] / totals[1]).item()

    def _evaluate_and_report(
        self, data_iter: Iterator[Batch] | None, where: str, periodic: bool = False
    ) -> float | None:
        """Evaluate and print the box. As in Megatron, --manual-gc collects around the evaluations during
        training only, and the final ones write no scalars after --skip-train."""
        if data_iter is None or self.cfg.eval_iters == 0:
            return None
        self.logger.pause()
        if periodic:
            manual_gc_before_evaluation(self.cfg)
        self.logger.timers("evaluate", log_level=0).start(barrier=True)
        loss = self.evaluate(data_iter)
        self.logger.timers("evaluate").stop()
        self.logger.log_timers(["evaluate"])
        if periodic:
            manual_gc_after_evaluation(self.cfg)
        if loss is not None:
            write = periodic or not self.cfg.skip_train
            box = self.logger.evaluation(where, loss, self.iteration, self.consumed_train_samples, write)
            if box is not None:
                self.result.log_lines.append(box)
        self.logger.resume()
        return loss

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
