"""AdamW with Megatron's weight-decay groups, optionally sharded over data-parallel ranks (ZeRO-1)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.config import MegatronConfig
from megatron_lite.parallel_state import ParallelState

# torch's fused AdamW kernels exist for these device types; elsewhere torch picks foreach/for-loop itself.
_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DistributedDataParallel or torch.compile wrapper."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (>= 2-D, not biases) decay; biases, norms and other 1-D params do not."""
    decay, no_decay = [], []
    for name, param in unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and not name.endswith(".bias"):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module, cfg: MegatronConfig, pstate: ParallelState | None = None
) -> torch.optim.Optimizer:
    """AdamW over the model's parameters (DDP-wrapped or not); with --use-distributed-optimizer and
    more than one data-parallel rank, each DP rank keeps the Adam state of its share of the parameters.

    The learning rate is set by OptimizerParamScheduler; the value given here is only the start.
    """
    pstate = pstate or ParallelState()
    groups = param_groups(model, cfg.weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    kwargs = {
        "lr": cfg.lr,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_eps,
        "weight_decay": cfg.weight_decay,
    }
    if len(devices) == 1 and devices <= set(_FUSED_DEVICES):
        kwargs["fused"] = True
    if cfg.use_distributed_optimizer and pstate.dp_size > 1:
        # Imported here: torch.distributed.optim scripts TorchScript functions at import, slow and noisy.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            groups, optimizer_class=torch.optim.AdamW, process_group=pstate.dp_group, **kwargs
        )
    return torch.optim.AdamW(groups, **kwargs)
