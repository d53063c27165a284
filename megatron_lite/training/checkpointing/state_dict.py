"""The model and optimizer as DCP sees them: shards to write (with layouts) and targets to read into."""

# Optimizer state (AdamW's exp_avg, exp_avg_sq, step) is keyed by parameter name and stored with its
# parameter's layout, so it reshards like the parameter; under ZeRO each DP rank holds a share of it.

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing import keys
from megatron_lite.training.checkpointing.chunks import ChunkSavePlanner
from megatron_lite.training.checkpointing.layout import Layout, layout_of, load_target, to_stored
from megatron_lite.training.expert_optimizer import ExpertParallelOptimizer


def model_shards(
    module: torch.nn.Module, cfg: MegatronConfig, pstate: ParallelState, *, staged: bool = False
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """This rank's model tensors keyed for DCP, and their layouts (staged: private CPU copies)."""
    shards, layouts = {}, {}
    for name, tensor, param in keys.named_model_tensors(module):
        layout = layout_of(name, tensor, param, pstate, cfg.vocab_size or 0, cfg.make_vocab_size_divisible_by)
        key = keys.model_key(name)
        shards[key] = to_stored(tensor.detach(), layout, pstate, staged=staged)
        layouts[key] = layout.to_dict()
    return shards, layouts


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: under ZeRO, the one over this DP rank's share; for a
    MoE model's two sharded optimizers, a view of both local ones."""
    if isinstance(optimizer, ExpertParallelOptimizer):
        return optimizer.local_view()
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer


def _parameter_names(module: torch.nn.Module) -> dict[int, str]:
    return {id(param): name for name, param in module.named_parameters()}


def optimizer_shards(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    cfg: MegatronConfig,
    pstate: ParallelState,
    *,
    staged: bool = False,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """This rank's optimizer states keyed for DCP, their layouts, and the param groups (lr, names)."""
    names = _parameter_names(module)
    local = local_optimizer(optimizer)
    shards, layouts = {}, {}
    for group in local.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            for key, value in local.state.get(param, {}).items():
                is_python = not torch.is_tensor(value)
                tensor = torch.tensor(value) if is_python else value.detach()
                layout = layout_of(
                    name, tensor, param, pstate, cfg.vocab_size or 0, cfg.make_vocab_size_divisible_by
                )
                full_key = keys.optimizer_state_key(name, key)
                shards[full_key] = to_stored(tensor, layout, pstate, staged=staged)
                layouts[full_key] = {**layout.to_dict(), "param": name, "state": key, "python": is_python}
    groups = [
        {"lr": group["lr"], "params": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return shards, layouts, groups


def model_targets(
    module: torch.nn.Module, saved_layouts: dict[str, dict[str, Any]], pstate: ParallelState, ckpt: Path
) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """DCP load targets that write straight into the model's parameters (or, where the stored layout
    cannot map onto this rank's shard, full buffers plus the copies that finish the job)."""
    targets: dict[str, Any] = {}
    finishers: list[Callable[[], None]] = []
    problems = []
    wanted = set()
    for name, tensor, param in keys.named_model_tensors(module):
        key = keys.model_key(name)
        wanted.add(key)
        if key not in saved_layouts:
            problems.append(f"it has no tensor {name}")
            continue
        saved = Layout.from_dict(saved_layouts[key])
        current = layout_of(name, tensor, param, pstate, saved.vocab_size, saved.block)
        if saved.logical_shape != current.logical_shape:
            problems.append(
                f"{name} is {list(saved.logical_shape)} in it, {list(current.logical_shape)} in the model"
            )
            continue
        target, finish = load_target(tensor.detach(), saved, current, pstate)
        targets[key] = target
        if finish is not None:
            finishers.append(finish)
    extra = sorted(
        keys.model_name(k)
        for k in saved_layouts
        if keys.is_model_key(k) and k not in wanted and not _other_ranks_expert(k, wanted)
    )
    problems += [f"the model has no tensor {name}" for name in extra]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        fail(f"checkpoint {ckpt} does not fit this model: {'; '.join(problems[:3])}{more}")
    return targets, finishers


def _other_ranks_expert(key: str, wanted: set[str]) -> bool:
    """A routed expert (named by global index) that another expert-parallel rank of this model holds."""
    marker = ".experts.local_experts."
    return marker in key and any(marker in k for k in wanted)


def optimizer_targets(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    saved_layouts: dict[str, dict[str, Any]],
    pstate: ParallelState,
) -> tuple[dict[str, Any], list[Callable[[], None]], dict[torch.nn.Parameter, dict[str, Any]]]:
    """Fresh state tensors for every parameter this rank's optimizer owns, and their DCP targets."""
    by_param: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, values in saved_layouts.items():
        if keys.is_optimizer_state_key(key):
            by_param.setdefault(values["param"], []).append((key, values))
    names = _parameter_names(module)
    local = local_optimizer(optimizer)
    targets: dict[str, Any] = {}
    finishers: list[Callable[[], None]] = []
    new_states: dict[torch.nn.Parameter, dict[str, Any]] = {}
    for group in local.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            name = names[id(param)]
            state: dict[str, Any] = {}
            for key, values in by_param.get(name, []):
                saved = Layout.from_dict(values)
                param_layout = Layout.from_dict(saved_layouts[keys.model_key(name)])
                if saved.kind != "replicated" or saved.full_shape == param_layout.full_shape:
                    buffer = torch.zeros_like(param, dtype=saved.torch_dtype)
                else:
                    device = param.device if on_device else torch.device("cpu")
                    buffer = torch.zeros(saved.stored_shape, dtype=saved.torch_dtype, device=device)
                current = layout_of(name, buffer, param, pstate, saved.vocab_size, saved.block)
                target, finish = load_target(buffer, saved, current, pstate)
                targets[key] = target
                if finish is not None:
                    finishers.append(finish)
                state[values["state"]] = (buffer, values["python"])
            new_states[param] = state
    return targets, finishers, new_states


def install_optimizer_state(
    optimizer: torch.optim.Optimizer,
    new_states: dict[torch.nn.Parameter, dict[str, Any]],
    saved_groups: list[dict[str, Any]],
) -> None:
    local = local_optimizer(optimizer)
    for param, state in new_states.items():
        if state:
            local.state[param] = {k: (t.item() if is_python else t) for k, (t, is_python) in state.items()}
        else:
            local.state.pop(param, None)
    if len(saved_groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group["lr"] = saved["lr"]


def save_planner(cfg: MegatronConfig, pstate: ParallelState) -> DefaultSavePlanner:
    """DCP's planner; with --ckpt-assume-constant-structure it reuses the previous save's plan (DCP's
    plan caching) when no rank's local plan changed, as Megatron caches its save structure."""
    if not cfg.ckpt_assume_constant_structure:
        return ChunkSavePlanner()
    planner = ChunkSavePlanner(enable_plan_caching=True)
    # DCP keys its class-level cache by planner class; one key per world shape keeps plans of another
    # layout in the same process (tests) from being merged with these.
    planner._cached_plans_key = f"megatron_lite:{pstate.world_size}x{pstate.tp_size}"
    return planner
