"""One training step: micro batches forward and backward (or the pipeline schedule), reduce, clip, step."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from megatron_lite.core.pipeline_parallel.embedding_group import all_reduce_embedding_grads
from megatron_lite.training.grad_utils import all_reduce_gradients, clip_grad_norm, micro_batch_loss_weights
from megatron_lite.training.log_stats import count_zeros_in_grad

Batch = dict[str, torch.Tensor]


class TrainerStep:
    """Mixed into Trainer: uses its cfg, pstate, model, DDP wrapper, optimizer, scheduler, scaler and hooks."""

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

    def _sum_over_grad_group(self, value: torch.Tensor) -> torch.Tensor:
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
            self.moe.before_backward(factor * self.scaler.scale, self.iteration + 1)
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
        totals = self._sum_over_grad_group(torch.stack([loss_sum, num_tokens.sum()]))
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
            self.moe_losses = self.moe.after_step(n, self.logger.writers)
        timers("optimizer").stop()
        return lm_loss, grad_norm, skipped
