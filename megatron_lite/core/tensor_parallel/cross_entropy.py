"""Cross entropy over vocab-sharded logits, without ever gathering the full vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        # logits: [..., V/tp] fp32, this rank's slice of the vocabulary; target: [...] global ids.
        partition = logits.shape[-1]
        rank = 0 if group is None else dist.get_rank(group)
        start = rank * partition
        # Padding columns (ids >= the true vocabulary, always at the end) take no probability and get no
        # gradient, so a padded model's loss equals the unpadded one's.
        real = partition if vocab_size is None else max(0, min(partition, vocab_size - start))

        if real > 0:
            logits_max = logits[..., :real].max(dim=-1).values
        else:
            logits_max = logits.new_full(logits.shape[:-1], float("-inf"))
        _all_reduce(logits_max, dist.ReduceOp.MAX, group)
        shifted = logits - logits_max.unsqueeze(-1)
        if real < partition:
            shifted[..., real:] = float("-inf")

        local_target = target - start
        outside = (local_target < 0) | (local_target >= partition)
        local_target = local_target.masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = predicted.masked_fill(outside, 0.0)
        _all_reduce(predicted, dist.ReduceOp.SUM, group)

        exp_logits = shifted.exp_()  # shifted is our own tensor: reuse its memory
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)

        loss = sum_exp.log() - predicted
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target), the onehot only on the rank owning the target.
        grad = softmax.clone()
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token loss from logits sharded on the last dim over the TP group.

    logits: [..., V_padded/tp] (any float dtype; the math is fp32); target: [...] int64 global ids.
    vocab_size: the true vocabulary; logit columns at or beyond it are padding and are excluded.
    Returns fp32 loss with target's shape.
    """
    return _VocabParallelCrossEntropy.apply(logits.float(), target, group, vocab_size)
