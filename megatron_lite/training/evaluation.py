"""The trainer's evaluation: Megatron's lm loss over --eval-iters global batches, and its report box."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_lite.training.runtime import manual_gc_after_evaluation, manual_gc_before_evaluation

Batch = dict[str, torch.Tensor]


class TrainerEvaluation:
    """Mixed into Trainer: uses its model, pipeline, data helpers, logger and result."""

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
        totals = self._sum_over_grad_group(totals)
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
