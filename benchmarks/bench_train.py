"""Training throughput and MFU of our GPTModel against a plain PyTorch GPT (and HF GPT-2) in the same run.

    python benchmarks/bench_train.py                      # cpu-small; fp32, and bf16 where it is fast
    python benchmarks/bench_train.py --dtype fp32 --windows 7 --iters 3
    python benchmarks/bench_train.py --config gpt2-124m --windows 3 --no-hf
    python benchmarks/bench_train.py --config gpt2-124m --device cuda
    python benchmarks/bench_train.py --dtype bf16 --compile          # + ours under --compile

Every contender runs the same training step: forward with the loss, backward, gradient clipping at
1.0 and AdamW with the same settings (fused, as build_optimizer picks on CPU and CUDA), and reads the
loss back (a sync, as a logged loss is). Ours is the real thing: the Trainer pretrain_gpt.py builds from
the same MegatronConfig, stepped through Trainer.train_step on batches shaped as the data loader yields
them (benchmarks/train_contenders.py), so the benchmark cannot drift from training. It runs with the
fp32 matmul path megatron_lite.core.performance picks for this machine (printed; the baselines keep
torch's default); --compile adds a row of ours under --compile (the trainer's torch.compile). Timed windows are interleaved (ours, plain,
HF, then plain, HF, ours, ...) so drifts in machine load hit all alike, and the median window is
reported (the best-window ratio too: on a shared machine it is the one least disturbed by other
processes). FLOPs use Megatron's formula for every model (same shapes, same padded vocabulary), and
MFU divides by the device peak of megatron_lite.training.flops.

Then one step of ours and of the plain GPT is profiled (torch.profiler), batch fetched from the mock
dataset's DataLoader as in training, and its time is split into op groups: matmuls, attention, loss,
optimizer (zero_grad, clipping, AdamW), data, other ops (norms, activations, residual adds, copies), and
time spent outside any op (Python, autograd engine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.step_breakdown import print_breakdown, sync  # noqa: E402
from benchmarks.train_contenders import (  # noqa: E402
    CONFIGS,
    Contender,
    build_config,
    make_hf,
    make_ours,
    make_plain,
    synthetic_batches,
)
from megatron_lite.core.performance import (  # noqa: E402
    POLICIES,
    configure_matmul_precision,
    matmul_precision,
)
from megatron_lite.training.flops import (  # noqa: E402
    device_peak_flops,
    measure_matmul_flops,
    num_floating_point_operations,
)

# Steps per config when not given: (warm-up, timed windows, profiled steps). A gpt2-124m step takes
# 15-30 s on a 2-core CPU, so it gets fewer.
DEFAULT_STEPS = {"cpu-small": (2, 5, 2), "gpt2-124m": (1, 3, 1)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def run_dtype(args: argparse.Namespace, dtype_name: str, device: torch.device, precision: str) -> None:
    autocast_dtype = DTYPES[dtype_name]
    bf16 = autocast_dtype is not None
    cfg = build_config(args.config, args.micro_batch_size, bf16, args.num_layers)
    b, s = cfg.micro_batch_size, cfg.seq_length
    batches = synthetic_batches(cfg, device)
    ours = [make_ours(cfg, device, precision)]
    if args.compile:
        ours.append(
            make_ours(
                build_config(args.config, args.micro_batch_size, bf16, args.num_layers, True),
                device,
                precision,
            )
        )
    baselines = [make_plain(cfg, device)] + ([] if args.no_hf else [make_hf(cfg, device)])
    contenders = ours + [c for c in baselines if c is not None]
    flops = num_floating_point_operations(cfg, b)
    with matmul_precision(precision):  # the best path this machine has, as ours uses
        peak, peak_source = device_peak_flops(device, autocast_dtype or torch.float32, args.peak_tflops)

    step_index = 0

    def run(contender: Contender, iters: int) -> float:
        nonlocal step_index
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            batch = batches[step_index % len(batches)]
            step_index += 1
            contender.last_loss = contender.step(batch)
        sync(device)
        return time.perf_counter() - start

    for contender in contenders:
        start = time.perf_counter()
        run(contender, args.warmup)
        if contender.name.endswith("compiled"):
            print(
                f"  ({contender.name}: {args.warmup} warm-up steps incl. compiling took "
                f"{time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    for round_index in range(args.windows):
        # Each round starts with the next contender, so none always runs right after the same one.
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            contender.window_seconds.append(run(contender, args.iters))
        if args.peak_tflops is None and device.type == "cpu":
            # The CPU peak is measured, and a shared machine's load varies: measure it again in every
            # round, like one more contender, and keep the best rate seen during the run.
            with matmul_precision(precision):
                peak, peak_source = measure_matmul_flops(
                    device, autocast_dtype or torch.float32, use_cache=False
                )

    print(
        f"\n{dtype_name}{' autocast' if autocast_dtype else ''}: peak {peak / 1e12:.3f} TFLOP/s ({peak_source})"
    )
    print(
        f"  {'model':<22}{'tokens/s':>10}{'min..max':>18}{'TFLOP/s':>10}{'MFU':>8}{'ms/iter':>10}{'loss':>8}"
    )
    tokens_per_iter = b * s
    rates = {}
    for c in contenders:
        per_iter = statistics.median(c.window_seconds) / args.iters
        rates[c.name] = tokens_per_iter / per_iter
        lo = tokens_per_iter * args.iters / max(c.window_seconds)
        hi = tokens_per_iter * args.iters / min(c.window_seconds)
        tflops = flops / per_iter / 1e12
        print(
            f"  {c.name:<22}{rates[c.name]:>10,.0f}{f'{lo:,.0f}..{hi:,.0f}':>18}{tflops:>10.3f}"
            f"{tflops * 1e12 / peak:>8.1%}{per_iter * 1e3:>10.1f}{c.last_loss:>8.3f}"
        )
    pairs = [(o, c) for o in ours for c in contenders[len(ours) :]] + [(o, ours[0]) for o in ours[1:]]
    for mine, other in pairs:
        # The best window is the one least disturbed by other load on a shared machine; windows of the
        # same round ran back to back, so their ratio is the least exposed to drifts in that load.
        best_ratio = min(other.window_seconds) / min(mine.window_seconds)
        paired = statistics.median(t / o for t, o in zip(other.window_seconds, mine.window_seconds))
        print(
            f"  {mine.name} / {other.name}: {rates[mine.name] / rates[other.name]:.2f}x (median windows), "
            f"{best_ratio:.2f}x (best windows), {paired:.2f}x (median of same-round pairs)"
        )
    if len(baselines) > 1 and baselines[1] is None:
        print("  HF GPT2LMHeadModel: skipped (transformers is not installed)")
    if args.breakdown_steps > 0:
        print_breakdown(cfg, device, [ours[0], contenders[len(ours)]], args.breakdown_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "both"],
        default="auto",
        help="auto: fp32, and bf16 autocast where the device has fast bf16 matmuls (GPUs, CPUs with "
        "native bf16); a CPU without them runs bf16 10-20x slower than fp32 and would take many minutes.",
    )
    parser.add_argument("--iters", type=int, default=1, help="Training steps per timed window.")
    parser.add_argument(
        "--windows", type=int, help="Timed windows per model, median reported (default 5; gpt2-124m 3)."
    )
    parser.add_argument("--warmup", type=int, help="Untimed steps per model first (default 2; gpt2-124m 1).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads.")
    parser.add_argument("--micro-batch-size", type=int, help="Override the config's micro batch.")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--peak-tflops", type=float, help="Device peak for MFU (default: table or measured).")
    parser.add_argument(
        "--matmul-precision",
        choices=POLICIES,
        default="auto",
        help="fp32 matmul path for ours (megatron_lite.core.performance): auto measures and keeps a faster "
        "path only if its error stays at fp32 level; the baselines always use torch's default.",
    )
    parser.add_argument(
        "--compile", action="store_true", help="Add a row of ours under --compile (torch.compile)."
    )
    parser.add_argument("--num-layers", type=int, help="Override the config's layers (a shorter run).")
    parser.add_argument("--no-hf", action="store_true", help="Leave out the HF GPT2LMHeadModel contender.")
    parser.add_argument(
        "--breakdown-steps",
        type=int,
        help="Profiled steps per model for the time breakdown, 0 for none (default 2; gpt2-124m 1).",
    )
    args = parser.parse_args()
    warmup, windows, breakdown = DEFAULT_STEPS[args.config]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.windows = windows if args.windows is None else args.windows
    args.breakdown_steps = breakdown if args.breakdown_steps is None else args.breakdown_steps
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = build_config(args.config, args.micro_batch_size, False, args.num_layers)
    print(
        f"bench_train: {args.config} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, seq {cfg.seq_length}, micro batch {cfg.micro_batch_size}, "
        f"vocab {cfg.vocab_size} padded to {cfg.padded_vocab_size}, dropout 0); device {device}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    print(
        f"  {num_floating_point_operations(cfg, cfg.micro_batch_size) / 1e9:.1f} GFLOP per iteration "
        f"(Megatron's formula); {args.warmup} warm-up steps, then {args.windows} interleaved windows "
        f"of {args.iters} steps per model; median window reported"
    )
    default_precision = torch.get_float32_matmul_precision()
    print(f"  ours: {configure_matmul_precision(device, args.matmul_precision)}", flush=True)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(default_precision)  # the baselines keep torch's default
    for dtype_name in _dtypes_to_run(args.dtype, device):
        run_dtype(args, dtype_name, device, precision)


def _dtypes_to_run(choice: str, device: torch.device) -> list[str]:
    if choice != "auto":
        return ["fp32", "bf16"] if choice == "both" else [choice]
    if device.type == "cuda":
        return ["fp32", "bf16"]
    fp32, _ = device_peak_flops(device, torch.float32)
    bf16, _ = device_peak_flops(device, torch.bfloat16)
    if bf16 >= 0.5 * fp32:
        return ["fp32", "bf16"]
    print(
        f"  bf16 skipped: this CPU's bf16 matmul measures {bf16 / 1e12:.3f} TFLOP/s against "
        f"{fp32 / 1e12:.3f} in fp32 (no native bf16 units); --dtype bf16 times it anyway",
        flush=True,
    )
    return ["fp32"]


if __name__ == "__main__":
    main()
