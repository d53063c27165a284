"""bench_train's profile of one step: self CPU time per op group (matmuls, attention, loss, optimizer, ...)."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.train_contenders import Contender
from megatron_lite.config import MegatronConfig
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.data_samplers import build_mock_datasets, build_pretraining_data_loader


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer around a step sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
_ATTENTION_MARKS = (
    "scaled_dot_product",
    "ScaledDotProduct",
    "flash_attention",
    "efficient_attention",
    "_BlockedCausalAttention",  # megatron_lite's blocked kernel (forward and backward)
)
_ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"}
_LOSS_MARKS = ("CrossEntropy", "cross_entropy", "nll_loss", "NllLoss", "log_softmax", "LogSoftmax")
# The trainer's gradient norm and clipping (grad_utils.clip_grad_norm) are not inside a marked region:
# its foreach norms and scaling are recognised by name (nothing else in a step runs them).
_OPTIMIZER_OPS = {"aten::_foreach_norm", "aten::linalg_vector_norm", "aten::_foreach_mul_"}


def op_group(name: str, ancestors: list[str]) -> str:
    """The group of a profiled op from its name and the names of the events enclosing it."""
    names = [name, *ancestors]
    if "data" in names:
        return "data"
    if "optimizer" in names or name in _OPTIMIZER_OPS or any(n.startswith("Optimizer.") for n in names):
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
            sync(device)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                with record_function("data"):
                    batch = {k: v.to(device) for k, v in next(data).items()}
                contender.step(batch)
                sync(device)
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
