"""The distributed optimizer of MoE models: dense parameters sharded over the dense data-parallel group,
routed experts over their own expert-data-parallel group (Megatron's two DistributedOptimizers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
import torch.distributed as dist


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "is_expert", False))


def split_expert_groups(
    groups: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The param groups of the dense parameters and those of the routed experts (each group's settings kept;
    Megatron also keeps expert-parallel parameters in groups of their own)."""
    dense, experts = [], []
    for group in groups:
        for keep, out in ((False, dense), (True, experts)):
            params = [p for p in group["params"] if is_expert_parameter(p) == keep]
            if params:
                out.append({**group, "params": params})
    return dense, experts


def local_part(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's state: under ZeRO, the one over this rank's share."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


class ExpertParallelOptimizer:
    """Two optimizers stepped as one: `dense` (ZeRO over DP x CP) and `experts` (ZeRO over expert DP, or a
    plain optimizer where that group has one rank). Its param_groups are the two parts' own group dicts,
    so the learning-rate scheduler's writes reach them."""

    def __init__(self, dense: torch.optim.Optimizer, experts: torch.optim.Optimizer) -> None:
        self.dense = dense
        self.experts = experts
        self.parts = (dense, experts)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:
        return self.dense.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def finish_param_sync(self) -> None:
        """Wait for the --overlap-param-gather broadcasts of both parts."""
        for part in self.parts:
            finish = getattr(part, "finish_param_sync", None)
            if finish is not None:
                finish()

    def state_dict(self) -> dict[str, Any]:
        """This rank's shares of both parts (checkpoints go through the named, resharding path instead)."""
        return {
            "dense": local_part(self.dense).state_dict(),
            "experts": local_part(self.experts).state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        local_part(self.dense).load_state_dict(state_dict["dense"])
        local_part(self.experts).load_state_dict(state_dict["experts"])

    def local_view(self) -> LocalOptimizerView:
        """The state this rank holds, as one optimizer's param_groups and state (for checkpointing)."""
        return LocalOptimizerView([local_part(part) for part in self.parts])


class LocalOptimizerView:
    """The local optimizers of the parts seen as one: their param groups in order, and a state mapping
    that reads and writes each parameter's entry in the optimizer that owns it."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.param_groups = [group for opt in optimizers for group in opt.param_groups]
        self.state = _RoutedState(optimizers)


class _RoutedState(MutableMapping):
    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._owner = {
            param: opt for opt in optimizers for group in opt.param_groups for param in group["params"]
        }
        self._optimizers = optimizers

    def _state_of(self, param: torch.nn.Parameter) -> MutableMapping:
        if param not in self._owner:
            raise KeyError(param)
        return self._owner[param].state

    def __getitem__(self, param: torch.nn.Parameter) -> Any:
        state = self._state_of(param)
        if param not in state:
            raise KeyError(param)
        return state[param]

    def __setitem__(self, param: torch.nn.Parameter, value: Any) -> None:
        self._state_of(param)[param] = value

    def __delitem__(self, param: torch.nn.Parameter) -> None:
        del self._state_of(param)[param]

    def __iter__(self) -> Iterator[torch.nn.Parameter]:
        return (param for opt in self._optimizers for param in list(opt.state))

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


def build_expert_parallel_optimizer(
    groups: list[dict[str, Any]],
    make: Callable[[list[dict[str, Any]], dist.ProcessGroup | None], torch.optim.Optimizer],
    dense_group: dist.ProcessGroup,
    expert_group: dist.ProcessGroup | None,
    expert_group_size: int,
) -> ExpertParallelOptimizer:
    """`make(groups, process_group)` builds ZeRO over process_group, or the plain optimizer for None."""
    dense, experts = split_expert_groups(groups)
    return ExpertParallelOptimizer(
        make(dense, dense_group), make(experts, expert_group if expert_group_size > 1 else None)
    )
