"""Megatron's optimizers (AdamW-style Adam or SGD) over its param groups, optionally sharded over data-parallel
ranks (ZeRO-1), with the updated parameters gathered asynchronously under --overlap-param-gather."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.config import MegatronConfig
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.expert_optimizer import build_expert_parallel_optimizer, is_expert_parameter

# torch's fused AdamW kernels exist for these device types; elsewhere torch picks foreach/for-loop itself.
_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")

# The parameters Megatron's LanguageModule marks `is_embedding_or_output_parameter` (--decoupled-lr applies
# to them): the word embeddings and the untied output layer; not the position embeddings.
EMBEDDING_OR_OUTPUT_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DistributedDataParallel or torch.compile wrapper."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_embedding_or_output_parameter(name: str, param: torch.nn.Parameter) -> bool:
    return (
        bool(getattr(param, "is_embedding_or_output_parameter", False))
        or name in EMBEDDING_OR_OUTPUT_PARAMETERS
    )


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    *,
    lr: float | None = None,
    min_lr: float = 0.0,
    decoupled_lr: float | None = None,
    decoupled_min_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Megatron's param groups (core.optimizer._get_param_groups with its standard overrides).

    Biases and 1-D parameters (norms) get wd_mult 0, everything else 1; with --decoupled-lr the word
    embeddings and output layer get their own max_lr (and min_lr: --decoupled-min-lr, else --min-lr).
    Groups are ordered as Megatron sorts them: default, decoupled, decoupled without decay, without decay.
    The scheduler sets each group's lr from its max_lr/min_lr and its weight decay as wd x wd_mult.
    """
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        no_wd = param.ndim == 1 or name.endswith(".bias")
        decoupled = decoupled_lr is not None and is_embedding_or_output_parameter(name, param)
        buckets.setdefault((decoupled, no_wd), []).append(param)
    groups = []
    for decoupled, no_wd in ((False, False), (True, False), (True, True), (False, True)):
        params = buckets.get((decoupled, no_wd))
        if not params:
            continue
        group: dict[str, Any] = {
            "params": params,
            "wd_mult": 0.0 if no_wd else 1.0,
            "weight_decay": 0.0 if no_wd else weight_decay,
            "is_decoupled_lr": decoupled,
            # Megatron logs the learning rate of the groups that follow the schedule's own lr.
            "default_config": not decoupled,
        }
        if decoupled:
            group["max_lr"] = decoupled_lr
            group["min_lr"] = decoupled_min_lr if decoupled_min_lr is not None else min_lr
        elif lr is not None:
            group["max_lr"], group["min_lr"] = lr, min_lr
        groups.append(group)
    return groups


def build_optimizer(
    model: torch.nn.Module, cfg: MegatronConfig, pstate: ParallelState | None = None
) -> torch.optim.Optimizer:
    """Adam (AdamW-style, as Megatron's default decoupled weight decay) or SGD over the model's parameters
    (DDP-wrapped or not); with --use-distributed-optimizer and more than one data-parallel rank, each DP
    rank keeps the optimizer state of its share of the parameters.

    Learning rates and weight decays are set by OptimizerParamScheduler; the values given here are only
    the start.
    """
    pstate = pstate or ParallelState()
    groups = param_groups(
        model,
        cfg.weight_decay,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        decoupled_lr=cfg.decoupled_lr,
        decoupled_min_lr=cfg.decoupled_min_lr,
    )
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        # torch's SGD adds weight_decay x param to the gradient (L2), as Megatron's SGD (torch or apex FusedSGD).
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD
        kwargs["momentum"] = cfg.sgd_momentum
    else:
        optimizer_class = torch.optim.AdamW
        kwargs.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        devices = {p.device.type for g in groups for p in g["params"]}
        if len(devices) == 1 and devices <= set(_FUSED_DEVICES):
            kwargs["fused"] = True
    if cfg.use_distributed_optimizer and pstate.grad_size > 1:
        # Imported here: torch.distributed.optim scripts TorchScript functions at import, slow and noisy.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero_class = overlapped_gather_class() if cfg.overlap_param_gather else ZeroRedundancyOptimizer

        def make(groups: list[dict[str, Any]], group: Any) -> torch.optim.Optimizer:
            if group is None:
                return optimizer_class(groups, **kwargs)
            optimizer = zero_class(groups, optimizer_class=optimizer_class, process_group=group, **kwargs)
            if cfg.overlap_param_gather:
                optimizer.install_forward_pre_hooks(unwrap_model(model))
            return optimizer

        experts = expert_parallel_state(model)
        if experts is not None and any(is_expert_parameter(p) for g in groups for p in g["params"]):
            # Megatron: routed experts are sharded over their own expert-data-parallel group.
            return build_expert_parallel_optimizer(
                groups, make, pstate.grad_group, experts.edp_group, experts.edp_size
            )
        return make(groups, pstate.grad_group)
    return optimizer_class(groups, **kwargs)


def expert_parallel_state(model: torch.nn.Module) -> Any:
    """The expert groups (ExpertParallelState) the model's MoE layers were built with, else None."""
    for module in unwrap_model(model).modules():
        state = getattr(module, "expert_parallel", None)
        if state is not None:
            return state
    return None


def finish_param_sync(optimizer: torch.optim.Optimizer) -> None:
    """Wait for an --overlap-param-gather gather still in flight (before reading or saving the weights)."""
    finish = getattr(optimizer, "finish_param_sync", None)
    if finish is not None:
        finish()


_OVERLAPPED_GATHER_CLASS: type | None = None


def overlapped_gather_class() -> type:
    """ZeroRedundancyOptimizer whose step leaves the parameter gather running (--overlap-param-gather).

    Built on first use, as torch.distributed.optim is slow to import.
    """
    global _OVERLAPPED_GATHER_CLASS
    if _OVERLAPPED_GATHER_CLASS is not None:
        return _OVERLAPPED_GATHER_CLASS
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class ZeroWithOverlappedParamGather(ZeroRedundancyOptimizer):
        """ZeRO-1 that broadcasts each updated parameter from its owner asynchronously, in the model's
        parameter (forward) order, and lets each module wait for its own parameters in a forward pre-hook,
        so the gather of later layers overlaps the next forward of earlier ones (Megatron's param-gather
        overlap, here with per-parameter broadcasts instead of bucketed all-gathers)."""

        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            self._pending: dict[torch.nn.Parameter, Any] = {}
            self._gather_order: list[torch.nn.Parameter] = []

        def install_forward_pre_hooks(self, module: torch.nn.Module) -> None:
            owned = {p for g in self.param_groups for p in g["params"]}
            in_module = [p for p in module.parameters() if p in owned]
            seen = set(in_module)
            self._gather_order = in_module + [
                p for g in self.param_groups for p in g["params"] if p not in seen
            ]
            for sub in module.modules():
                direct = [p for p in sub.parameters(recurse=False) if p in owned]
                if direct:
                    sub.register_forward_pre_hook(self._wait_hook(direct))

        def _wait_hook(self, params: list[torch.nn.Parameter]) -> Any:
            # Run eagerly even inside a compiled region: a collective's handle cannot be traced.
            @torch.compiler.disable
            def hook(module: torch.nn.Module, args: Any) -> None:
                for param in params:
                    work = self._pending.pop(param, None)
                    if work is not None:
                        work.wait()

            return hook

        def step(self, closure: Any = None, **kwargs: Any) -> Any:
            self.finish_param_sync()  # the parameters this rank updates must not be in flight
            loss = self._local_step(closure=closure, **kwargs)
            owner = self._param_to_rank
            for param in self._gather_order:
                src = dist.get_global_rank(self.process_group, owner[param])
                self._pending[param] = dist.broadcast(
                    param.data, src=src, group=self.process_group, async_op=True
                )
            return loss

        def finish_param_sync(self) -> None:
            for work in self._pending.values():
                work.wait()
            self._pending.clear()

    _OVERLAPPED_GATHER_CLASS = ZeroWithOverlappedParamGather
    return _OVERLAPPED_GATHER_CLASS
