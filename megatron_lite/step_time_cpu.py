"""The step-time model's "cpu" device: this machine's matmul, attention and memory rates, measured at the model's shapes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_lite.config import MegatronConfig
from megatron_lite.step_time_model import DeviceSpec

# gloo between processes on one host, measured on this session's 2-core machine (2 ranks, all-reduce of
# 0.26-16.8 MB, 2026-12-02): about 0.9 GB/s bus bandwidth and 0.2 ms per ring step. Shared-memory
# transport: every rank is "in the node".
GLOO_GBPS = 0.9
GLOO_LATENCY_US = 200.0


def _best_seconds(fn: Callable[[], object], budget_s: float) -> float:
    """Fastest of a few calls after one warm-up (on a shared machine the fastest is the least disturbed)."""
    fn()
    best, deadline, reps = float("inf"), time.perf_counter() + budget_s, 0
    while reps < 2 or (time.perf_counter() < deadline and reps < 20):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        reps += 1
    return best


def measure_cpu_device(cfg: MegatronConfig, budget_s: float = 1.5) -> DeviceSpec:
    """A DeviceSpec for this CPU and this model.

    Each rank's threads are the cores divided over the ranks (as OMP_NUM_THREADS=1 under torchrun on 2
    cores), at most this process's torch threads. The "peak" is F.linear's rate over the layer's own
    per-rank GEMM shapes in the run's dtype, so gemm_efficiency is 1; the attention core is timed apart
    (SDPA forward and backward, counted as Megatron counts it: 3 x 4·b·s²·a·kv/t); memory bandwidth is
    an add of activation-sized tensors. With several ranks on this host, as many processes measure at
    once (they share the cores and the memory bus as the ranks will) and the slowest sets each rate,
    because a synchronous step waits for its slowest rank.
    """
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // cfg.world_size))
    shapes = _shapes(cfg)
    ranks = min(cfg.world_size, os.cpu_count() or 1)
    if ranks == 1:
        gemm, attention, memory = _measure(shapes, dtype, threads, budget_s)
    else:
        gemm, attention, memory = (
            min(r) for r in zip(*_measure_concurrently(ranks, shapes, dtype, threads, budget_s))
        )
    return DeviceSpec(
        name=f"this CPU ({threads} thread{'s' if threads > 1 else ''} per rank, {str(dtype)[6:]})",
        peak_tflops=gemm / 1e12,
        hbm_gbps=memory / 1e9,
        gpus_per_node=max(cfg.world_size, os.cpu_count() or 1),
        intra_node_gbps=GLOO_GBPS,
        inter_node_gbps=GLOO_GBPS,
        intra_latency_us=GLOO_LATENCY_US,
        inter_latency_us=GLOO_LATENCY_US,
        gemm_efficiency=1.0,
        attention_tflops=attention / 1e12,
        link_efficiency=1.0,
        memory_efficiency=1.0,
        note=f"measured now at this model's per-rank shapes{f', {ranks} ranks at once' if ranks > 1 else ''}; "
        "gloo links as measured here",
    )


def _shapes(cfg: MegatronConfig) -> dict:
    """What one rank multiplies: tokens per micro batch, GEMM (in, out) shapes, attention heads."""
    t = cfg.tensor_model_parallel_size
    h, kv = cfg.hidden_size, cfg.kv_channels
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    fc1 = cfg.ffn_hidden_size * (2 if cfg.swiglu else 1)
    seq = cfg.seq_length // cfg.context_parallel_size
    return {
        "batch": cfg.micro_batch_size,
        "seq": seq,
        "hidden": h,
        "heads": max(1, a // t),
        "kv": kv,
        "gemms": [  # (in, out) per rank: QKV, proj, fc1, fc2, the logits
            (h, (a + 2 * g) * kv // t),
            (a * kv // t, h),
            (h, fc1 // t),
            (cfg.ffn_hidden_size // t, h),
            (h, cfg.padded_vocab_size // t),
        ],
    }


def _measure_concurrently(
    ranks: int, shapes: dict, dtype: torch.dtype, threads: int, budget_s: float
) -> list[tuple[float, float, float]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(ranks), ctx.Queue()
    procs = [
        ctx.Process(target=_measure_worker, args=(barrier, results, shapes, dtype, threads, budget_s))
        for _ in range(ranks)
    ]
    for proc in procs:
        proc.start()
    try:
        return [results.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)


def _measure_worker(
    barrier, results, shapes: dict, dtype: torch.dtype, threads: int, budget_s: float
) -> None:
    barrier.wait()  # every process has imported torch: measure together
    results.put(_measure(shapes, dtype, threads, budget_s))


def _measure(shapes: dict, dtype: torch.dtype, threads: int, budget_s: float) -> tuple[float, float, float]:
    """(GEMM FLOP/s, attention FLOP/s, memory bytes/s) of one rank with `threads` threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _timed(shapes, dtype, budget_s)
    finally:
        torch.set_num_threads(saved)


def _timed(shapes: dict, dtype: torch.dtype, budget_s: float) -> tuple[float, float, float]:
    b, s, h, heads, kv = (shapes[k] for k in ("batch", "seq", "hidden", "heads", "kv"))
    tokens = b * s
    gen = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    share = budget_s / (len(shapes["gemms"]) + 2)
    for k, n in shapes["gemms"]:
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        flops += 2.0 * tokens * k * n
        seconds += _best_seconds(lambda x=x, w=w: F.linear(x, w), share)
    gemm = flops / seconds

    q, key, value = (torch.randn(b, heads, s, kv, generator=gen).to(dtype).requires_grad_() for _ in range(3))

    def attention_step() -> None:
        out = F.scaled_dot_product_attention(q, key, value, is_causal=True)
        out.sum().backward()

    attention = 3 * 4.0 * b * s * s * heads * kv / _best_seconds(attention_step, share)

    x = torch.randn(tokens, h, generator=gen).to(dtype)
    y = torch.randn(tokens, h, generator=gen).to(dtype)
    out = torch.empty_like(x)
    memory = 3 * x.numel() * x.element_size() / _best_seconds(lambda: torch.add(x, y, out=out), share)
    return gemm, attention, memory
