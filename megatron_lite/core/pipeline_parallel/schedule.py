"""1F1B and interleaved 1F1B over this rank's model chunks, run by torch.distributed.pipelining."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from megatron_lite.core.pipeline_parallel.stage import StageModule
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState

Batch = dict[str, torch.Tensor]
# Megatron's loss_func: (per-token loss [b, s] of the last stage, loss mask [b, s]) -> the summed loss.
LossFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PipelineSchedule:
    """Runs a step's micro batches through the pipeline: forward and backward (1F1B, or interleaved 1F1B
    with several chunks per rank), or forward only for evaluation.

    The last stage applies the trainer's loss_func to each micro batch and backpropagates it times the
    trainer's weight for that micro batch; the summed (unweighted) losses are returned on the last stage,
    zero elsewhere.
    """

    def __init__(
        self, chunks: list[nn.Module], pstate: ParallelState, *, micro_batch_size: int, seq_length: int
    ) -> None:
        """Stage inputs and outputs have fixed shapes: the micro batch's tokens [b, s] (int64) into the
        first stage, hidden states [s, b, h] ([s/tp, b, h] under sequence parallelism) between stages,
        the per-token loss [b, s] (fp32) out of the last."""
        self.chunks = chunks
        self.pstate = pstate
        cfg = chunks[0].config
        local_seq = seq_length // pstate.tp_size if cfg.sequence_parallel else seq_length
        dtype = next(chunks[0].parameters()).dtype
        self._hidden = torch.empty(
            local_seq, micro_batch_size, cfg.hidden_size, dtype=dtype, requires_grad=True
        )
        self._tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long)
        self._loss = torch.empty(micro_batch_size, seq_length, dtype=torch.float32, requires_grad=True)
        self._schedules: dict[int, object] = {}
        # Filled while a step runs: which micro batch the last stage's next loss belongs to.
        self._loss_func: LossFunc | None = None
        self._weights: list[float] = []
        self._losses: list[torch.Tensor] = []

    def _schedule(self, num_microbatches: int):
        """A torch schedule for this many micro batches (new stages: their buffers are sized by it)."""
        schedule = self._schedules.get(num_microbatches)
        if schedule is not None:
            return schedule
        p, v = self.pstate.pp_size, len(self.chunks)
        if v > 1 and num_microbatches % p != 0:
            # Reached with --rampup-batch-size, whose batch sizes the config check cannot see ahead.
            fail(
                f"interleaved pipeline parallelism needs the micro batches per step ({num_microbatches}) to be "
                f"a multiple of --pipeline-model-parallel-size {p}"
            )
        # Static shapes: torch then runs no inference forward/backward on the first step (which would
        # call the loss function and draw dropout masks an uninterrupted run does not draw again).
        device = self.pstate.device
        stages = [
            PipelineStage(
                StageModule(chunk),
                stage_index=k * p + self.pstate.pp_rank,
                num_stages=p * v,
                device=device,
                input_args=(self._tokens if chunk.pre_process else self._hidden).to(device),
                output_args=(self._loss if chunk.post_process else self._hidden).to(device),
                group=self.pstate.pp_group,
            )
            for k, chunk in enumerate(self.chunks)
        ]
        # The trainer's weights already carry Megatron's normalisation: no division by the count.
        if v == 1:
            schedule = Schedule1F1B(stages[0], num_microbatches, loss_fn=self._stage_loss, scale_grads=False)
        else:
            schedule = ScheduleInterleaved1F1B(
                stages, num_microbatches, loss_fn=self._stage_loss, scale_grads=False
            )
        self._schedules[num_microbatches] = schedule
        return schedule

    def _stage_loss(self, per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Called by torch on the last stage once per micro batch, in micro-batch order."""
        index = len(self._losses)
        loss = self._loss_func(per_token, loss_mask)
        self._losses.append(loss.detach())
        return loss * self._weights[index]

    def _run(
        self,
        batches: list[Batch],
        loss_func: LossFunc,
        weights: list[float],
        autocast: Callable[[], AbstractContextManager],
        forward_only: bool,
    ) -> torch.Tensor:
        self._loss_func, self._weights, self._losses = loss_func, weights, []
        schedule = self._schedule(len(batches))
        kwargs = {"position_ids": torch.cat([_position_ids(b) for b in batches])}
        # As on one stage (Trainer._attention_mask): the loader's mask matters only with separated documents.
        if batches[0].get("attention_mask") is not None and self.chunks[0].config.reset_attention_mask:
            kwargs["attention_mask"] = torch.cat([b["attention_mask"] for b in batches])
        kwargs["labels"] = torch.cat([b["labels"] for b in batches])
        target = torch.cat([b["loss_mask"] for b in batches])
        tokens = torch.cat([b["tokens"] for b in batches])
        first = self.pstate.is_pipeline_first_stage
        args = (tokens,) if first else ()
        with autocast():
            if forward_only:
                schedule.eval(*args, target=target, **kwargs)
            else:
                schedule.step(*args, target=target, return_outputs=False, **kwargs)
        total = torch.zeros((), device=self.pstate.device)
        for loss in self._losses:
            total += loss.float()
        self._loss_func, self._losses = None, []
        return total

    def forward_backward(
        self,
        batches: list[Batch],
        loss_func: LossFunc,
        weights: list[float],
        autocast: Callable[[], AbstractContextManager],
    ) -> torch.Tensor:
        """One training step's forward and backward; gradients accumulate in the chunks' parameters."""
        return self._run(batches, loss_func, weights, autocast, forward_only=False)

    def forward_only(
        self, batches: list[Batch], loss_func: LossFunc, autocast: Callable[[], AbstractContextManager]
    ) -> torch.Tensor:
        """The summed loss of the micro batches without backward (evaluation), on the last stage."""
        return self._run(batches, loss_func, [1.0] * len(batches), autocast, forward_only=True)

    def broadcast_from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value of a tensor on every stage (the loss that only it computes)."""
        src = dist.get_global_rank(self.pstate.pp_group, self.pstate.pp_size - 1)
        dist.broadcast(value, src=src, group=self.pstate.pp_group)
        return value


def _position_ids(batch: Batch) -> torch.Tensor:
    """The batch's position ids, or 0..s-1 per sequence as the model's default (middle stages have no
    tokens to infer them from)."""
    if batch.get("position_ids") is not None:
        return batch["position_ids"]
    b, s = batch["tokens"].shape
    return torch.arange(s, device=batch["tokens"].device).unsqueeze(0).expand(b, s)
