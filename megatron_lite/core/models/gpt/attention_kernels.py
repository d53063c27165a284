"""Blocked causal attention for CPUs: skips fully masked key blocks, fp32 softmax statistics, bf16 matmuls."""

from __future__ import annotations

import torch

# Query positions per block. Smaller blocks skip more of the masked upper triangle (the share computed is
# (n + 1) / 2n of the square for n blocks) but give smaller matmuls and more ops per layer; compiled, 128
# measured best at seq 256, head dim 64 (benchmarks/bench_attention.py).
DEFAULT_BLOCK = 128
# The longest sequence DotProductAttention hands the kernel under torch.compile: compiled, it measured
# 1.7-2.1x SDPA's CPU flash kernel at seq 256 in bf16, but 0.5-0.7x at seq 1024, where SDPA's kernel,
# which also skips masked blocks, has the longer rows it is fast on.
BLOCKED_MAX_SEQ = 256


def blocked_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    window_left: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v: query [b, heads, s, d], key/value [b, groups, s, d] (GQA: head i
    uses group i // (heads / groups)) -> [b, heads, s, d] in query's dtype.

    Query block i only meets keys up to its own last position (and from its first position minus
    window_left on), so the masked blocks above the diagonal are never computed; the scores of one block
    are widened to fp32 for the softmax, whose log-sum-exp is all the backward keeps besides the inputs
    and output (it recomputes each block's probabilities, as flash attention does).
    """
    return _BlockedCausalAttention.apply(query, key, value, scale, window_left, block)


def _group_rows(query: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, heads, s, d] -> [b, groups, s * r, d], rows ordered (position, head in group): the rows of a
    block of positions are contiguous and every row of a group meets the same keys."""
    b, heads, s, d = query.shape
    r = heads // groups
    return query.reshape(b, groups, r, s, d).transpose(2, 3).reshape(b, groups, s * r, d)


def _ungroup_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    b, groups, sr, d = rows.shape
    r = heads // groups
    return rows.view(b, groups, sr // r, r, d).transpose(2, 3).reshape(b, heads, sr // r, d)


def _blocks(s: int, block: int, window_left: int | None):
    """(first query, end query, first key) of each query block; keys run up to the block's end."""
    for start in range(0, s, block):
        end = min(start + block, s)
        first_key = 0 if window_left is None else max(0, start - window_left)
        yield start, end, first_key


def _keep_mask(start: int, end: int, first_key: int, r: int, window_left: int | None, device) -> torch.Tensor:
    """[(end - start) * r, end - first_key] True where the row's query position may see the key."""
    positions = torch.arange(start, end, device=device).repeat_interleave(r)[:, None]
    keys = torch.arange(first_key, end, device=device)[None, :]
    keep = keys <= positions
    if window_left is not None:
        keep &= keys >= positions - window_left
    return keep


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale, window_left, block):
        b, heads, s, d = query.shape
        groups = key.shape[1]
        r = heads // groups
        q = _group_rows(query, groups)  # [b, g, s*r, d]
        out = torch.empty_like(q)
        lse = torch.empty(b, groups, s * r, dtype=torch.float32, device=query.device)
        for start, end, first_key in _blocks(s, block, window_left):
            rows = slice(start * r, end * r)
            scores = torch.matmul(q[:, :, rows], key[:, :, first_key:end].transpose(-2, -1)).float()
            scores.mul_(scale)
            scores.masked_fill_(
                ~_keep_mask(start, end, first_key, r, window_left, query.device), float("-inf")
            )
            block_lse = torch.logsumexp(scores, dim=-1)  # [b, g, rows]
            probs = scores.sub_(block_lse.unsqueeze(-1)).exp_().to(query.dtype)
            out[:, :, rows] = torch.matmul(probs, value[:, :, first_key:end])
            lse[:, :, rows] = block_lse
        ctx.save_for_backward(q, key, value, out, lse)
        ctx.scale, ctx.window_left, ctx.block, ctx.heads = scale, window_left, block, heads
        return _ungroup_rows(out, heads)

    @staticmethod
    def backward(ctx, grad_out):
        q, key, value, out, lse = ctx.saved_tensors
        scale, window_left, block, heads = ctx.scale, ctx.window_left, ctx.block, ctx.heads
        groups, s = key.shape[1], key.shape[2]
        r = heads // groups
        dout = _group_rows(grad_out.to(q.dtype), groups)
        # D_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax backward's row term, in fp32.
        delta = (dout.float() * out.float()).sum(-1)  # [b, g, s*r]
        dq = torch.empty_like(q)
        # fp32 accumulators: every query block adds into the keys it saw.
        dk = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for start, end, first_key in _blocks(s, block, window_left):
            rows = slice(start * r, end * r)
            k_blk, v_blk = key[:, :, first_key:end], value[:, :, first_key:end]
            q_blk, do_blk = q[:, :, rows], dout[:, :, rows]
            scores = torch.matmul(q_blk, k_blk.transpose(-2, -1)).float()
            scores.mul_(scale)
            scores.masked_fill_(~_keep_mask(start, end, first_key, r, window_left, q.device), float("-inf"))
            probs = scores.sub_(lse[:, :, rows].unsqueeze(-1)).exp_()  # fp32 [b, g, rows, keys]
            dv[:, :, first_key:end] += torch.matmul(probs.to(q.dtype).transpose(-2, -1), do_blk).float()
            dprobs = torch.matmul(do_blk, v_blk.transpose(-2, -1)).float()
            dscores = probs.mul_(dprobs.sub_(delta[:, :, rows].unsqueeze(-1))).mul_(scale).to(q.dtype)
            dq[:, :, rows] = torch.matmul(dscores, k_blk)
            dk[:, :, first_key:end] += torch.matmul(dscores.transpose(-2, -1), q_blk).float()
        return _ungroup_rows(dq, heads), dk.to(key.dtype), dv.to(value.dtype), None, None, None
