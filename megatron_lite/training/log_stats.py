"""What the log reports besides the loss: gradient zeros (--log-num-zeros-in-grad) and memory (mem-* tags)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_lite.parallel_state import ParallelState


def memory_stats(device: torch.device) -> dict[str, float]:
    """Megatron's mem-* TensorBoard values: the CUDA caching allocator's statistics on a GPU; on CPU this
    process's virtual size (reserved), resident size (allocated) and peak resident size, without a count."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {
            "mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"],
        }
    status = _proc_status_bytes()
    if {"VmSize", "VmRSS", "VmHWM"} <= status.keys():
        return {
            "mem-reserved-bytes": status["VmSize"],
            "mem-allocated-bytes": status["VmRSS"],
            "mem-max-allocated-bytes": status["VmHWM"],
        }
    import resource  # not Linux: only the peak is known

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mem-allocated-bytes": peak, "mem-max-allocated-bytes": peak}


def _proc_status_bytes() -> dict[str, float]:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            lines = status.read().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB":
            values[name] = float(int(fields[0]) * 1024)
    return values


def count_zeros_in_grad(
    parameters: Iterable[torch.nn.Parameter], pstate: ParallelState | None = None
) -> float:
    """--log-num-zeros-in-grad: zero elements of the whole model's gradient, counted as Megatron does.

    TP-sharded parameters hold different slices on each TP rank, so their counts are summed over the TP
    group; replicated ones are counted once. DP ranks hold the same (averaged) gradient, so each counts
    the whole model. Returned as Megatron's float32 value.
    """
    pstate = pstate or ParallelState()
    grads = [
        (p.grad, bool(getattr(p, "tensor_model_parallel", False)))
        for p in parameters
        if p.grad is not None and not getattr(p, "shared", False)  # a tied copy counts on the first stage
    ]
    counts = torch.zeros(2, dtype=torch.int64, device=pstate.device)  # (sharded, replicated)
    for grad, sharded in grads:
        counts[0 if sharded else 1] += grad.numel() - torch.count_nonzero(grad)
    if pstate.tp_size > 1:
        sharded = counts[:1].clone()
        dist.all_reduce(sharded, group=pstate.tp_group)
        counts[0] = sharded[0]
    if pstate.pp_size > 1:  # each pipeline stage holds its own layers
        dist.all_reduce(counts, group=pstate.pp_group)
    return torch.tensor(float(counts.sum().item()), dtype=torch.float32).item()
