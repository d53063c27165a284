"""Exact causal attention over a sequence split across context-parallel ranks: K/V ring (p2p) or all-gather.

Every rank holds queries, keys and values of its own 2 of the 2C chunks (sequence_split.cp_positions). The
result equals attention over the whole sequence: masking is done on global positions, and the ring's
blockwise partial results are merged with their softmax statistics (running max and sum), as flash
attention merges blocks. Shapes: query [b, heads, s/C, d], key and value [b, groups, s/C, d] (GQA:
heads = groups x heads-per-group, head i uses group i // heads-per-group).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.core.context_parallel.sequence_split import cp_positions

CP_COMM_TYPES = ("p2p", "all_gather")


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cp_group: dist.ProcessGroup,
    comm_type: str = "p2p",
    window_left: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal on global positions) v for this rank's queries -> [b, heads, s/C, d].

    dropout_p > 0 drops attention probabilities with masks drawn from dropout_seed (one generator per
    block), so backward, and a recomputed forward given the same seed, see the same masks.
    """
    if comm_type == "all_gather":
        return _all_gather_attention(query, key, value, cp_group, window_left, dropout_p, dropout_seed)
    if comm_type == "p2p":
        return _RingAttention.apply(query, key, value, cp_group, window_left, dropout_p, dropout_seed)
    raise ValueError(f"cp_comm_type {comm_type!r} is not one of {CP_COMM_TYPES}")


def _keep(q_pos: torch.Tensor, k_pos: torch.Tensor, window_left: int | None) -> torch.Tensor:
    """[sq, sk] True where a query may attend a key: causal on global positions, within the window."""
    keep = k_pos[None, :] <= q_pos[:, None]
    if window_left is not None:
        keep = keep & (k_pos[None, :] >= q_pos[:, None] - window_left)
    return keep


def _ranks(group: dist.ProcessGroup) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _dropout_scale(
    shape: torch.Size, p: float, seed: int, block: int, device: torch.device
) -> torch.Tensor | None:
    """Kept entries 1 / (1 - p), dropped 0, for one block (None without dropout): a generator per block,
    so the mask is the same whenever the same seed asks for it."""
    if p == 0.0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + 1_000_003 * block) % (2**63 - 1))
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(torch.float32) / (1.0 - p)


# ---- all_gather: every rank gathers the whole sequence's K/V ------------------------------------------
class _GatherSequence(torch.autograd.Function):
    """[2, b, g, s/C, d] -> [C, 2, b, g, s/C, d] from every CP rank; backward sums the gradients back."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        # The collectives take tensors concatenated along dim 0; the rank axis is a view of that.
        out = torch.empty((size * kv.shape[0], *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
        dist.all_gather_into_tensor(out, kv.contiguous(), group=group)
        return out.view(size, *kv.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous().flatten(0, 1), group=ctx.group)
        return out, None


def _all_gather_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: dist.ProcessGroup,
    window_left: int | None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> torch.Tensor:
    rank, size = _ranks(group)
    local = query.shape[2]
    seq = local * size
    gathered = _GatherSequence.apply(torch.stack([key, value]), group)  # [C, 2, b, g, s/C, d]
    k_all = torch.cat(gathered[:, 0].unbind(0), dim=2)  # [b, g, s, d] in rank order, not position order
    v_all = torch.cat(gathered[:, 1].unbind(0), dim=2)
    k_pos = torch.cat([cp_positions(seq, size, r, query.device) for r in range(size)])
    keep = _keep(cp_positions(seq, size, rank, query.device), k_pos, window_left)
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(
            query, k_all, v_all, attn_mask=keep, enable_gqa=query.shape[1] != key.shape[1]
        )
    repeat = query.shape[1] // key.shape[1]
    scores = torch.matmul(query, _expand(k_all, repeat).transpose(-2, -1)) / math.sqrt(query.shape[-1])
    probs = torch.softmax(
        scores.masked_fill(~keep, -math.inf), dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)
    )
    scale = _dropout_scale(probs.shape, dropout_p, dropout_seed, 0, query.device)
    return torch.matmul((probs * scale.to(probs.dtype)).to(query.dtype), _expand(v_all, repeat))


# ---- p2p: K/V blocks travel around the ring ---------------------------------------------------------
def _exchange(send: torch.Tensor, group: dist.ProcessGroup, forward: bool) -> tuple[torch.Tensor, list]:
    """Post a send of `send` to the next rank (forward) or the previous one, and a receive from the other;
    returns the receive buffer and the requests to wait on (so compute overlaps the transfer)."""
    rank, size = _ranks(group)
    to, frm = ((rank + 1) % size, (rank - 1) % size) if forward else ((rank - 1) % size, (rank + 1) % size)
    recv = torch.empty_like(send)
    reqs = [
        dist.isend(send, dist.get_global_rank(group, to), group=group),
        dist.irecv(recv, dist.get_global_rank(group, frm), group=group),
    ]
    return recv, reqs


def _expand(kv: torch.Tensor, repeat: int) -> torch.Tensor:
    """[.., g, s, d] -> [.., g * repeat, s, d]: each group's K or V for its query heads."""
    return kv if repeat == 1 else kv.repeat_interleave(repeat, dim=-3)


def _fold(grad: torch.Tensor, repeat: int) -> torch.Tensor:
    """[b, heads, s, d] -> [b, groups, s, d]: the gradients of a group's heads summed."""
    if repeat == 1:
        return grad
    b, heads, s, d = grad.shape
    return grad.view(b, heads // repeat, repeat, s, d).sum(2)


def _block_plan(
    rank: int, src: int, q_pos: torch.Tensor, k_pos: torch.Tensor, window_left: int | None
) -> tuple[slice, slice, torch.Tensor | None]:
    """Which of this rank's query rows meet which of rank src's keys, and the mask there (None: all visible).

    With Megatron's chunk pairs (r, 2C-1-r) the causal structure is known without looking: an earlier
    rank's first chunk is wholly visible to both query chunks and its second to neither; a later rank's
    chunks are wholly visible to the second query chunk only. So off-diagonal blocks are half the work and
    need no mask; the diagonal block and sliding windows are masked from global positions.
    """
    if src == rank or window_left is not None:
        return slice(None), slice(None), _keep(q_pos, k_pos, window_left)
    half = q_pos.shape[0] // 2
    if src < rank:
        return slice(None), slice(0, half), None
    return slice(half, None), slice(None), None


class _RingAttention(torch.autograd.Function):
    """Ring attention: C steps, each attends this rank's queries to one rank's K/V block while the next
    block is in flight; backward sends the blocks around again with their K/V gradients travelling along."""

    @staticmethod
    def forward(ctx, query, key, value, group, window_left, dropout_p, dropout_seed):
        rank, size = _ranks(group)
        repeat = query.shape[1] // key.shape[1]
        scale = 1.0 / math.sqrt(query.shape[-1])
        seq = query.shape[2] * size
        acc_dtype = torch.promote_types(query.dtype, torch.float32)  # softmax statistics in fp32 at least
        q = query.to(acc_dtype)
        q_pos = cp_positions(seq, size, rank, query.device)
        b, heads, sq, d = q.shape
        row_max = torch.full((b, heads, sq), -math.inf, dtype=acc_dtype, device=q.device)
        row_sum = torch.zeros((b, heads, sq), dtype=acc_dtype, device=q.device)
        acc = torch.zeros((b, heads, sq, d), dtype=acc_dtype, device=q.device)
        kv = torch.stack([key, value]).contiguous()  # [2, b, g, s/C, d]
        for step in range(size):
            pending = _exchange(kv, group, forward=True) if step < size - 1 else None
            src = (rank - step) % size
            rows, cols, keep = _block_plan(
                rank, src, q_pos, cp_positions(seq, size, src, q.device), window_left
            )
            k = _expand(kv[0, :, :, cols].to(acc_dtype), repeat)
            v = _expand(kv[1, :, :, cols].to(acc_dtype), repeat)
            scores = torch.matmul(q[:, :, rows], k.transpose(-2, -1)) * scale
            if keep is not None:
                scores.masked_fill_(~keep, -math.inf)
            old_max = row_max[..., rows]
            new_max = torch.maximum(old_max, scores.amax(-1))
            # A row with no visible key yet has max -inf; shift by 0 there so no inf - inf appears.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - shift[..., None])
            rescale = torch.exp(old_max - shift)
            row_sum[..., rows] = row_sum[..., rows] * rescale + probs.sum(-1)  # the softmax's, undropped
            drop = _dropout_scale(probs.shape, dropout_p, dropout_seed, step, q.device)
            kept = probs if drop is None else probs * drop.to(acc_dtype)
            acc[:, :, rows] = acc[:, :, rows] * rescale[..., None] + torch.matmul(kept, v)
            row_max[..., rows] = new_max
            if pending is not None:
                recv, reqs = pending
                for req in reqs:
                    req.wait()
                kv = recv
        out = acc / row_sum[..., None]  # every query sees at least itself, so row_sum > 0
        lse = row_max + torch.log(row_sum)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.group, ctx.window_left, ctx.scale, ctx.repeat = group, window_left, scale, repeat
        ctx.dropout = (dropout_p, dropout_seed)
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        group, repeat, scale = ctx.group, ctx.repeat, ctx.scale
        rank, size = _ranks(group)
        seq = query.shape[2] * size
        acc_dtype = out.dtype
        q, dout = query.to(acc_dtype), grad_out.to(acc_dtype)
        q_pos = cp_positions(seq, size, rank, query.device)
        delta = (dout * out).sum(-1, keepdim=True)  # [b, heads, s/C, 1]
        dq = torch.zeros_like(q)
        kv = torch.stack([key, value]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)  # travels with its block
        for step in range(size):
            pending = _exchange(kv, group, forward=True) if step < size - 1 else None
            src = (rank - step) % size
            k_pos = cp_positions(seq, size, src, q.device)
            rows, cols, keep = _block_plan(rank, src, q_pos, k_pos, ctx.window_left)
            k = _expand(kv[0, :, :, cols].to(acc_dtype), repeat)
            v = _expand(kv[1, :, :, cols].to(acc_dtype), repeat)
            q_rows, dout_rows = q[:, :, rows], dout[:, :, rows]
            scores = torch.matmul(q_rows, k.transpose(-2, -1)) * scale
            if keep is not None:
                scores.masked_fill_(~keep, -math.inf)
            probs = torch.exp(scores - lse[..., rows, None])  # the final softmax, block by block
            # With dropout out = (mask * probs) v: the mask scales dprobs and the probs v sees; delta
            # (dout . out) already holds the dropped sum.
            drop = _dropout_scale(probs.shape, *ctx.dropout, step, q.device)
            dprobs = torch.matmul(dout_rows, v.transpose(-2, -1))
            kept = probs
            if drop is not None:
                drop = drop.to(acc_dtype)
                dprobs, kept = dprobs * drop, probs * drop
            dscores = probs * (dprobs - delta[:, :, rows])
            dq[:, :, rows] += torch.matmul(dscores, k) * scale
            dkv[0, :, :, cols] += _fold(torch.matmul(dscores.transpose(-2, -1), q_rows) * scale, repeat)
            dkv[1, :, :, cols] += _fold(torch.matmul(kept.transpose(-2, -1), dout_rows), repeat)
            if size == 1:
                break
            # This block's gradient goes on to the next rank with it (one hop behind the block itself).
            dkv_recv, dkv_reqs = _exchange(dkv, group, forward=True)
            if pending is not None:
                recv, reqs = pending
                for req in reqs:
                    req.wait()
                kv = recv
            for req in dkv_reqs:
                req.wait()
            dkv = dkv_recv
        # After C hops every block's gradient is back on the rank that owns the block.
        return dq.to(query.dtype), dkv[0].to(key.dtype), dkv[1].to(value.dtype), None, None, None, None
