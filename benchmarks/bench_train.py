"""Training throughput and MFU of our GPTModel against a plain PyTorch GPT (and HF GPT-2) in the same run.

    python benchmarks/bench_train.py                      # cpu-small; fp32, and bf16 where it is fast
    python benchmarks/bench_train.py --dtype fp32 --windows 7 --iters 3
    python benchmarks/bench_train.py --config gpt2-124m --windows 3 --no-hf
    python benchmarks/bench_train.py --config gpt2-124m --device cuda

Every contender runs the same training step: forward with the loss, backward, gradient clipping at
1.0 and AdamW with the same settings (fused, as build_optimizer picks on CPU and CUDA). Ours runs with
the fp32 matmul path megatron_lite.core.performance picks for this machine (printed; the baselines keep
torch's default), and with --compile under torch.compile. Timed windows are interleaved (ours, plain,
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
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plain_gpt import PlainGPT, PlainGPTConfig  # noqa: E402
from megatron_lite.config import MegatronConfig  # noqa: E402
from megatron_lite.core.models.gpt import GPTModel  # noqa: E402
from megatron_lite.core.performance import (  # noqa: E402
    POLICIES,
    configure_matmul_precision,
    matmul_precision,
)
from megatron_lite.parallel_state import ParallelState  # noqa: E402
from megatron_lite.training.data_samplers import (  # noqa: E402
    build_mock_datasets,
    build_pretraining_data_loader,
)
from megatron_lite.training.flops import (  # noqa: E402
    device_peak_flops,
    measure_matmul_flops,
    num_floating_point_operations,
)
from megatron_lite.training.grad_utils import clip_grad_norm  # noqa: E402
from megatron_lite.training.optimizer import build_optimizer  # noqa: E402

CONFIGS = {
    # nanoGPT's shakespeare-char GPU shape on a byte vocabulary, sized for a CPU step of about a second.
    "cpu-small": dict(
        num_layers=6, hidden_size=384, num_attention_heads=6, seq_length=256, micro_batch_size=8, vocab=257
    ),
    # GPT-2 small's shape and vocabulary at a CPU-sized sequence: the 50k-vocabulary output layer and loss
    # weigh as they do in real GPT-2 training, and a step takes seconds rather than a minute.
    "gpt2-124m": dict(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        seq_length=256,
        micro_batch_size=8,
        vocab=50257,
    ),
}
# Steps per config when not given: (warm-up, timed windows, profiled steps). A gpt2-124m step takes
# 15-30 s on a 2-core CPU, so it gets fewer.
DEFAULT_STEPS = {"cpu-small": (2, 5, 2), "gpt2-124m": (1, 3, 1)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_config(name: str, micro_batch_size: int | None, bf16: bool) -> MegatronConfig:
    shape = dict(CONFIGS[name])
    vocab = shape.pop("vocab")
    if micro_batch_size is not None:
        shape["micro_batch_size"] = micro_batch_size
    cfg = MegatronConfig(
        **shape,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        lr=6e-4,
        train_iters=1,
        num_workers=0,  # the breakdown's batches come from the main process: their cost shows as data
        mock_data=True,
    )
    return cfg.finalize(world_size=1, vocab_size=vocab)


@dataclass
class Contender:
    name: str
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    window_seconds: list[float] = field(default_factory=list)
    last_loss: float = float("nan")


@dataclass
class OursOptions:
    """How ours runs: the fp32 matmul precision picked for this machine, and torch.compile or not."""

    matmul_precision: str = "highest"
    compile: bool = False


def make_ours(
    cfg: MegatronConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    options: OursOptions | None = None,
) -> Contender:
    options = options or OursOptions()
    pstate = ParallelState(device=device)
    model = GPTModel(cfg, pstate)
    model.train()
    forward_model = torch.compile(model) if options.compile else model
    optimizer = build_optimizer(model, cfg, pstate)
    params = list(model.parameters())

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The training loop's step (training.Trainer.train_step) for one micro batch, without logging.
        with matmul_precision(options.matmul_precision):
            with record_function("optimizer"):
                optimizer.zero_grad(set_to_none=True)
            with _autocast(device, autocast_dtype):
                per_token = forward_model(tokens, labels=labels)  # [b, s]
            loss = per_token.float().mean()
            loss.backward()
            with record_function("optimizer"):
                clip_grad_norm(params, cfg.clip_grad, pstate)
                optimizer.step()
        return loss.detach()

    name = "ours (GPTModel)" + (" compiled" if options.compile else "")
    return Contender(name, step)


def _same_adamw(groups: list[dict], cfg: MegatronConfig, device: torch.device) -> torch.optim.Optimizer:
    """The AdamW settings build_optimizer uses, for the baselines."""
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=device.type in ("cpu", "cuda"),
    )


def make_plain(cfg: MegatronConfig, device: torch.device, autocast_dtype: torch.dtype | None) -> Contender:
    torch.manual_seed(cfg.seed)
    model = PlainGPT(
        PlainGPTConfig(
            vocab_size=cfg.padded_vocab_size,
            block_size=cfg.max_position_embeddings,
            n_layer=cfg.num_layers,
            n_head=cfg.num_attention_heads,
            n_embd=cfg.hidden_size,
        )
    ).to(device)
    model.train()
    optimizer = _same_adamw(model.optimizer_groups(cfg.weight_decay), cfg, device)
    params = list(model.parameters())

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with record_function("optimizer"):
            optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast_dtype):
            loss = model(tokens, labels)
        loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
        return loss.detach()

    return Contender("plain PyTorch GPT", step)


def make_hf(
    cfg: MegatronConfig, device: torch.device, autocast_dtype: torch.dtype | None
) -> Contender | None:
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    hf_config = GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(hf_config).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = _same_adamw(groups, cfg, device)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast_dtype):
            # HF shifts labels itself: give it the inputs as labels so it sees the same s tokens.
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        return loss.detach()

    return Contender("HF GPT2LMHeadModel", step)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_dtype(args: argparse.Namespace, dtype_name: str, device: torch.device, options: OursOptions) -> None:
    autocast_dtype = DTYPES[dtype_name]
    cfg = build_config(args.config, args.micro_batch_size, bf16=autocast_dtype is not None)
    b, s = cfg.micro_batch_size, cfg.seq_length
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, cfg.vocab_size, (b, s + 1), generator=generator) for _ in range(4)]
    batches = [(x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)) for x in samples]
    makers = [lambda *a: make_ours(*a, options), make_plain] + ([] if args.no_hf else [make_hf])
    contenders = [c for c in (make(cfg, device, autocast_dtype) for make in makers) if c is not None]
    flops = num_floating_point_operations(cfg, b)
    with matmul_precision(options.matmul_precision):  # the best path this machine has, as ours uses
        peak, peak_source = device_peak_flops(device, autocast_dtype or torch.float32, args.peak_tflops)

    step_index = 0

    def run(contender: Contender, iters: int) -> float:
        nonlocal step_index
        _sync(device)
        start = time.perf_counter()
        loss = None
        for _ in range(iters):
            batch = batches[step_index % len(batches)]
            step_index += 1
            loss = contender.step(*batch)
        contender.last_loss = float(loss)  # .item() syncs, inside the window like a logged loss would
        _sync(device)
        return time.perf_counter() - start

    for contender in contenders:
        start = time.perf_counter()
        run(contender, args.warmup)
        if options.compile and contender is contenders[0]:
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
            with matmul_precision(options.matmul_precision):
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
    ours = contenders[0]
    for c in contenders[1:]:
        # The best window is the one least disturbed by other load on a shared machine; windows of the
        # same round ran back to back, so their ratio is the least exposed to drifts in that load.
        best_ratio = min(c.window_seconds) / min(ours.window_seconds)
        paired = statistics.median(t / o for t, o in zip(c.window_seconds, ours.window_seconds))
        print(
            f"  ours / {c.name}: {rates[ours.name] / rates[c.name]:.2f}x (median windows), "
            f"{best_ratio:.2f}x (best windows), {paired:.2f}x (median of same-round pairs)"
        )
    if len(contenders) < 3 and not args.no_hf:
        print("  HF GPT2LMHeadModel: skipped (transformers is not installed)")
    if args.breakdown_steps > 0:
        print_breakdown(cfg, device, contenders[:2], args.breakdown_steps)


# ---- where the step's time goes ----------------------------------------------------------------------
GROUPS = {
    "matmul": "matmuls (linear layers, output layer)",
    "attention": "attention (SDPA or explicit softmax)",
    "loss": "loss (cross entropy)",
    "optimizer": "optimizer (zero_grad, clip, AdamW)",
    "data": "data (DataLoader batch, to device)",
    "other": "other ops (norms, GELU, adds, copies)",
    "untracked": "outside ops (Python, autograd engine)",
}
_MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::matmul",
    "aten::linear",
    "aten::_addmm_activation",
    "aten::mkldnn_linear",
    "mkldnn::_linear_pointwise",
}
# bmm and softmax appear only in attention in these models (explicit attention and its backward).
_ATTENTION_MARKS = ("scaled_dot_product", "ScaledDotProduct", "flash_attention", "efficient_attention")
_ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"}
_LOSS_MARKS = ("CrossEntropy", "cross_entropy", "nll_loss", "NllLoss", "log_softmax", "LogSoftmax")


def op_group(name: str, ancestors: list[str]) -> str:
    """The group of a profiled op from its name and the names of the events enclosing it."""
    names = [name, *ancestors]
    if "data" in names:
        return "data"
    if "optimizer" in names or any(n.startswith("Optimizer.") for n in names):
        return "optimizer"
    if any(mark in n for n in names for mark in _LOSS_MARKS):
        return "loss"
    if name in _ATTENTION_OPS or any(mark in n for n in names for mark in _ATTENTION_MARKS):
        return "attention"
    if name in _MATMUL_OPS:
        return "matmul"
    return "other"


def step_breakdown(events, wall_us: float) -> dict[str, float]:
    """Self CPU time (us) per group over all profiled events; what no op covers is 'untracked'."""
    totals = dict.fromkeys(GROUPS, 0.0)
    for event in events:
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        totals[op_group(event.name, ancestors)] += event.self_cpu_time_total
    totals["untracked"] = max(0.0, wall_us - sum(totals.values()))
    return totals


def print_breakdown(
    cfg: MegatronConfig, device: torch.device, contenders: list[Contender], steps: int
) -> None:
    """Profile `steps` steps of each contender, fed by the training DataLoader; print the fastest's split."""
    dataset, _, _ = build_mock_datasets(cfg, (cfg.micro_batch_size * (2 * steps * len(contenders) + 1), 0, 0))
    data = iter(build_pretraining_data_loader(dataset, 0, cfg, ParallelState(device=device)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for _ in range(steps):
        for contender in contenders:
            _sync(device)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                with record_function("data"):
                    sample = next(data)
                    tokens, labels = sample["tokens"].to(device), sample["labels"].to(device)
                contender.step(tokens, labels)
                _sync(device)
                wall_us = (time.perf_counter() - start) * 1e6
            if contender.name not in best or wall_us < best[contender.name][0]:
                best[contender.name] = (wall_us, step_breakdown(prof.events(), wall_us))
    names = [c.name for c in contenders]
    note = " (CPU time on the host; GPU kernels overlap it)" if device.type == "cuda" else ""
    print(f"\n  where a step's time goes: fastest of {steps} profiled step(s) each{note}; ms and share")
    print(f"    {'':<40}" + "".join(f"{n[:22]:>24}" for n in names))
    for key, label in GROUPS.items():
        cells = "".join(f"{best[n][1][key] / 1e3:>14.1f} {best[n][1][key] / best[n][0]:>8.1%}" for n in names)
        print(f"    {label:<40}{cells}")
    print(f"    {'step (profiled)':<40}" + "".join(f"{best[n][0] / 1e3:>14.1f} {'':>8}" for n in names))


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
    parser.add_argument("--compile", action="store_true", help="Run ours under torch.compile.")
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
    cfg = build_config(args.config, args.micro_batch_size, bf16=False)
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
    options = OursOptions(torch.get_float32_matmul_precision(), args.compile)
    torch.set_float32_matmul_precision(default_precision)  # the baselines keep torch's default
    for dtype_name in _dtypes_to_run(args.dtype, device):
        run_dtype(args, dtype_name, device, options)


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
