"""Causal attention forward+backward on this device: candidate kernels against the current SDPA path.

    python benchmarks/bench_attention.py                       # seq 256 and 1024, fp32 and bf16
    python benchmarks/bench_attention.py --seq 256 --dtype bf16 --rounds 9
    python benchmarks/bench_attention.py --flex                # + FlexAttention (compiles for the CPU)

Candidates, all causal with head dim 64 (GPT-2's), [b, heads, s, d] inputs:
- sdpa: F.scaled_dot_product_attention(is_causal=True), DotProductAttention's path before round 2 (on CPU
  the flash-attention-for-CPU kernel)
- math: the explicit path, q k^T, fp32 softmax over the masked square, p v (what dropout runs)
- blocked-N: megatron_lite's blocked kernel with query blocks of N (masked key blocks skipped, fp32
  softmax statistics, matmuls in the input dtype)
- compiled-N: the blocked kernel under torch.compile, its element-wise ops fused (with --compiled)
- flex: torch's flex_attention with a causal block mask under torch.compile (with --flex; left out
  where torch has no FlexAttention backward for the CPU, as in torch 2.13)
- model: whatever DotProductAttention runs now for this shape and dtype

Timed rounds are interleaved (every candidate once per round, the starting one rotating) and the median
round is reported, with each candidate's ratio to sdpa (above 1: faster than sdpa).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.core.models.gpt.attention import DotProductAttention  # noqa: E402
from megatron_lite.core.models.gpt.attention_kernels import blocked_causal_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / q.shape[-1] ** 0.5)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def flex_attention_fn(seq: int, window: int | None) -> AttentionFn | None:
    """FlexAttention with a causal (and window) block mask, compiled; None where it cannot train here."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q, k):
        return (q >= k) if window is None else (q >= k) & (k >= q - window)

    mask = create_block_mask(causal, None, None, seq, seq, device="cpu")
    compiled = torch.compile(flex_attention)
    probe = torch.zeros(1, 1, seq, 64, requires_grad=True)
    try:
        compiled(probe, probe, probe, block_mask=mask).sum().backward()
    except NotImplementedError as error:  # torch 2.13: "FlexAttention does not support backward on CPU"
        print(f"  flex: left out, {str(error).splitlines()[0]}", flush=True)
        return None
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def model_attention_fn(heads: int, head_dim: int, window: int | None) -> AttentionFn:
    core = DotProductAttention(0.0, heads, heads, head_dim, window_left=window)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # DotProductAttention takes [s, b, heads, d] and returns [s, b, heads * d].
        b, _, s, d = q.shape
        out = core(q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3))
        return out.view(s, b, heads, d).permute(1, 2, 0, 3)

    return run


def causal_keep(seq: int, window: int | None) -> torch.Tensor:
    """[s, s] True where a query may see a key: causal, and within the window if there is one."""
    positions = torch.arange(seq)
    keep = positions[None, :] <= positions[:, None]
    if window is not None:
        keep &= positions[None, :] >= positions[:, None] - window
    return keep


def candidates(args: argparse.Namespace, seq: int, heads: int) -> dict[str, AttentionFn]:
    scale = 1.0 / args.head_dim**0.5
    window = args.window
    if window is None:
        fns: dict[str, AttentionFn] = {
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        }
    else:
        keep = causal_keep(seq, window)
        fns = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)}
    fns["math"] = lambda q, k, v: explicit_attention(q, k, v, causal_keep(seq, window))
    for block in args.blocks:
        fns[f"blocked-{block}"] = lambda q, k, v, n=block: blocked_causal_attention(q, k, v, scale, window, n)
    if args.compiled:
        # Every candidate and case compiles the same function: room for all their variants.
        torch._dynamo.config.recompile_limit = 64
        for block in args.blocks:
            kernel = torch.compile(blocked_causal_attention)
            fns[f"compiled-{block}"] = lambda q, k, v, n=block, f=kernel: f(q, k, v, scale, window, n)
    if args.flex:
        flex = flex_attention_fn(seq, window)
        if flex is not None:
            fns["flex"] = flex
    fns["model"] = model_attention_fn(heads, args.head_dim, window)
    return fns


def time_case(args: argparse.Namespace, seq: int, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    batch = args.batch if args.batch else max(1, 8 * 256 // seq)  # the same tokens per step at every seq
    shape = (batch, args.heads, seq, args.head_dim)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=generator).to(dtype)
    fns = candidates(args, seq, args.heads)

    def step(fn: AttentionFn) -> float:
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        elapsed = time.perf_counter() - start
        q.grad = k.grad = v.grad = None
        return elapsed

    reference = None
    for name, fn in fns.items():
        for _ in range(args.warmup):
            step(fn)
        with torch.no_grad():
            out = fn(q, k, v).float()
        reference = out if reference is None else reference
        error = float((out - reference).abs().max())
        if error > (5e-2 if dtype == torch.bfloat16 else 1e-4):
            print(f"  warning: {name} differs from sdpa by {error:.2e}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(step(fns[name]))
    # Causal attention FLOPs as Megatron counts them (half the square): forward 2 matmuls, backward 4.
    flops = 3 * 2 * 2 * batch * args.heads * seq * seq * args.head_dim / 2
    base = statistics.median(times["sdpa"])
    where = "" if args.window is None else f", window {args.window}"
    print(f"\nseq {seq}{where}, {dtype_name}, batch {batch}, {args.heads} heads, head dim {args.head_dim}:")
    print(f"  {'kernel':<14}{'ms fwd+bwd':>12}{'GFLOP/s':>10}{'vs sdpa':>9}{'paired':>9}")
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(s / t for s, t in zip(times["sdpa"], times[name]))
        print(
            f"  {name:<14}{median * 1e3:>12.2f}{flops / median / 1e9:>10.1f}{base / median:>8.2f}x"
            f"{paired:>8.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--batch", type=int, help="Default: 8 x 256 / seq (a micro batch of 2048 tokens).")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--window", type=int, help="Sliding window (--window-size N,0); default none.")
    parser.add_argument("--flex", action="store_true", help="Add FlexAttention (compiling takes minutes).")
    parser.add_argument(
        "--compiled", action="store_true", help="Add the blocked kernel under torch.compile (minutes)."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bench_attention: {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for seq in args.seq:
        for dtype_name in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
            time_case(args, seq, dtype_name)


if __name__ == "__main__":
    main()
