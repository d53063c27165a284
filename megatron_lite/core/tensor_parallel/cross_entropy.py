"""Cross entropy over vocab-sharded logits, without ever gathering the full vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist

# Rows are processed in chunks of about this many logits (32 MB of fp32), so the several passes a row
# needs (max, exp, sum, divide) reuse data still in the last-level cache instead of streaming hundreds of
# MB (a 50k vocabulary) from memory each time, and a low-precision chunk's fp32 scratch stays small.
# Not smaller: each op is a parallel region, and on a loaded CPU every region may wait for a descheduled
# thread; with 2 threads under load, 2M-element chunks ran 2x slower than 8M ones.
_CHUNK_ELEMENTS = 1 << 23


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _row_chunks(num_rows: int, num_cols: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, num_cols))
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _chunk_scratch(chunks: list[slice], num_cols: int, device: torch.device) -> torch.Tensor:
    """An fp32 buffer the size of the largest (first) chunk, reused for every chunk."""
    rows = chunks[0].stop - chunks[0].start if chunks else 0
    return torch.empty((rows, num_cols), dtype=torch.float32, device=device)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log(sum_v exp(x_v - max)) - (x_target - max), with the sums and max over the TP group.

    fp32 logits: the softmax is formed in place of a buffer (the logits themselves when `inplace`), which
    backward turns, again in place, into the gradient softmax - onehot(target). Lower-precision logits
    (bf16/fp16 autocast) are never copied to fp32 as a whole: each chunk is widened on the fly, only the
    per-row max and sum are kept, and backward recomputes the fp32 softmax chunk by chunk and writes the
    gradient in the logits' dtype (into the logits themselves when `inplace`).
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, inplace):
        # logits: [..., V/tp], this rank's slice of the vocabulary; target: [...] global ids.
        partition = logits.shape[-1]
        tp_size, rank = _world(group)
        start = rank * partition
        # Padding columns (ids >= the true vocabulary, always at the end) take no probability and get no
        # gradient, so a padded model's loss equals the unpadded one's.
        real = partition if vocab_size is None else max(0, min(partition, vocab_size - start))

        # [n, V/tp]: an alias of the logits' memory when they are contiguous. Detached, so the in-place
        # softmax and gradient below are plain tensor writes rather than edits of an autograd view.
        x = logits.detach().reshape(-1, partition).contiguous()
        n = x.shape[0]
        target = target.reshape(-1)
        local_target = target - start
        outside = (local_target < 0) | (local_target >= real)
        local_target = local_target.masked_fill(outside, 0)
        # Read the target logits now: an in-place softmax overwrites them below.
        target_logit = x.gather(1, local_target.unsqueeze(1)).squeeze(1).float()  # [n]

        store_softmax = x.dtype == torch.float32
        if store_softmax:
            softmax = x if inplace else torch.empty_like(x)
        chunks = _row_chunks(n, real)
        row_max = torch.full((n, 1), float("-inf"), dtype=torch.float32, device=x.device)
        sum_exp = torch.zeros((n, 1), dtype=torch.float32, device=x.device)
        fused = tp_size == 1  # no global max to wait for: each chunk is finished while in cache
        if real > 0 and not fused:
            for rows in chunks:
                row_max[rows] = torch.amax(x[rows, :real], dim=-1, keepdim=True)
        _all_reduce(row_max, dist.ReduceOp.MAX, group)
        if real > 0:
            scratch = None if store_softmax else _chunk_scratch(chunks, real, x.device)
            for rows in chunks:
                chunk = x[rows, :real]
                if fused:
                    row_max[rows] = torch.amax(chunk, dim=-1, keepdim=True)
                exp = softmax[rows, :real] if store_softmax else scratch[: rows.stop - rows.start]
                torch.sub(chunk, row_max[rows], out=exp)
                exp.exp_()
                torch.sum(exp, dim=-1, keepdim=True, out=sum_exp[rows])
                if fused and store_softmax:
                    exp.div_(sum_exp[rows])
        predicted = (target_logit - row_max.squeeze(1)).masked_fill_(outside, 0.0)
        if tp_size > 1:
            reduced = _all_reduce(torch.cat([sum_exp.squeeze(1), predicted]), dist.ReduceOp.SUM, group)
            sum_exp, predicted = reduced[:n].unsqueeze(1), reduced[n:]
            if store_softmax and real > 0:
                for rows in chunks:
                    softmax[rows, :real].div_(sum_exp[rows])
        if store_softmax and real < partition:
            softmax[:, real:] = 0.0
        loss = sum_exp.squeeze(1).log() - predicted

        ctx.logits_shape = logits.shape
        ctx.store_softmax = store_softmax
        ctx.inplace = inplace
        ctx.real = real
        ctx.consumed = False
        if store_softmax:
            ctx.save_for_backward(softmax, local_target, outside)
        else:
            ctx.save_for_backward(x, local_target, outside, row_max, sum_exp)
        return loss.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError(
                "vocab_parallel_cross_entropy turns its saved softmax into the gradient in place, so its "
                "backward can run only once per forward (no retain_graph)"
            )
        ctx.consumed = True
        grad_rows = grad_loss.reshape(-1, 1).float()  # [n, 1]
        if ctx.store_softmax:
            softmax, local_target, outside = ctx.saved_tensors
            # d loss / d logits = (softmax - onehot(target)) * grad, the onehot only on the owning rank.
            grad = softmax
            onehot = (~outside).to(grad.dtype).unsqueeze(-1)
            grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
            grad.mul_(grad_rows)
            return grad.view(ctx.logits_shape), None, None, None, None

        x, local_target, outside, row_max, sum_exp = ctx.saved_tensors
        real = ctx.real
        grad = x if ctx.inplace else torch.empty_like(x)
        if real > 0:
            chunks = _row_chunks(x.shape[0], real)
            scratch = _chunk_scratch(chunks, real, x.device)
            onehot = (~outside).to(torch.float32).unsqueeze(-1)
            for rows in chunks:
                probs = scratch[: rows.stop - rows.start]
                torch.sub(x[rows, :real], row_max[rows], out=probs)
                probs.exp_().div_(sum_exp[rows])
                probs.scatter_add_(-1, local_target[rows].unsqueeze(-1), -onehot[rows])
                probs.mul_(grad_rows[rows])
                grad[rows, :real].copy_(probs)
        if real < x.shape[1]:
            grad[:, real:] = 0.0
        return grad.view(ctx.logits_shape), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Per-token loss from logits sharded on the last dim over the TP group.

    logits: [..., V_padded/tp] (any float dtype; the math is fp32, and the gradient has the logits'
    dtype); target: [...] int64 global ids. vocab_size: the true vocabulary; logit columns at or beyond
    it are padding and are excluded. inplace: the logits are scratch the caller will not read again
    (GPTModel's output layer); their memory then holds the softmax and then the gradient, which saves
    allocating two more tensors of the logits' size. Returns fp32 loss with target's shape.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, inplace)
