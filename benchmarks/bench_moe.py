"""Forward + backward time of one MoE layer: the per-expert loop against the grouped GEMM (torch._grouped_mm),
and the dense MLP of the same active width, on one process.

    python benchmarks/bench_moe.py                         # fp32, defaults below
    python benchmarks/bench_moe.py --dtype bf16 --tokens 4096 --experts 16 --topk 2

Each round runs every contender once in a rotated order (machine-load drifts hit all alike); the median
and best round are printed in milliseconds and tokens per second. The loop and the grouped GEMM must give
the same output (checked first; exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.config import MegatronConfig  # noqa: E402
from megatron_lite.core.models.gpt.mlp import MLP  # noqa: E402
from megatron_lite.core.transformer.moe.moe_layer import MoELayer  # noqa: E402


def build(args: argparse.Namespace, **extra) -> MegatronConfig:
    values = dict(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, seq_length=args.tokens,
        micro_batch_size=1, lr=1e-3, mock_data=True, train_iters=1, swiglu=True, add_bias_linear=False,
        num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        ffn_hidden_size=args.ffn * args.topk, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    values.update(extra)
    return MegatronConfig(**values).finalize(1, 256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=512, help="each expert's ffn size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    loop = MoELayer(build(args), 0)
    grouped = MoELayer(build(args, moe_grouped_gemm=True), 0)
    grouped.load_state_dict(loop.state_dict())
    dense = MLP(build(args, num_experts=None, moe_ffn_hidden_size=None, moe_router_topk=2))
    x = torch.randn(args.tokens, 1, args.hidden)
    with torch.no_grad():
        diff = (loop(x) - grouped(x)).abs().max().item()
    print(f"max |loop - grouped| = {diff:.2e}")
    if diff > 1e-4:
        return 1

    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if args.dtype == "bf16"
        else contextlib.nullcontext
    )
    contenders = {"moe loop": loop, "moe grouped gemm": grouped, "dense mlp (same active ffn)": dense}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds + 1):  # the first round warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            module = contenders[name]
            module.zero_grad()
            start = time.perf_counter()
            with autocast():
                out = module(x.requires_grad_(True))
            out.float().sum().backward()
            if r > 0:
                times[name].append(time.perf_counter() - start)
    print(
        f"{args.tokens} tokens, hidden {args.hidden}, {args.experts} experts x ffn {args.ffn}, top-{args.topk}, {args.dtype}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:30s} median {median * 1e3:8.1f} ms  best {min(values) * 1e3:8.1f} ms  {args.tokens / median:10.0f} tokens/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
