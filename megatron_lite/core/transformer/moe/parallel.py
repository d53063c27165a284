"""Process groups of expert parallelism in Megatron's expert rank layout, and the collectives (with
autograd) that move tokens between expert ranks over gloo or NCCL."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.errors import fail


@dataclass
class ExpertParallelState:
    """Where this rank sits among the experts. Within a pipeline stage Megatron orders expert ranks as
    (etp fastest, then ep, then expert-dp): rank = etp_rank + etp * (ep_rank + ep * edp_rank).

    ep_group: ranks holding different experts (tokens are exchanged over it); etp_group: the slices of
    one expert; tp_ep_group: both (the all-gather dispatcher's domain); edp_group: replicas of the same
    expert slice, over which expert gradients are summed. dp_size is the dense data-parallel size, the
    divisor of expert gradients (Megatron's expert_gradient_scaling_factor).
    """

    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    edp_size: int = 1
    dp_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    etp_group: dist.ProcessGroup | None = None
    tp_ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None

    @property
    def tp_ep_size(self) -> int:
        return self.ep_size * self.etp_size


_CACHE: dict[tuple, ExpertParallelState] = {}


def build_expert_parallel_state(cfg, pstate) -> ExpertParallelState:
    """The expert groups for cfg's EP/ETP sizes on pstate's world (collective: every rank calls it; built
    once per world and sizes)."""
    ep = cfg.expert_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
    world = pstate.world_size
    pp = getattr(pstate, "pp_size", 1) or 1
    if world == 1 or not dist.is_initialized():
        if ep * etp != 1:
            fail(
                f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} needs that many processes"
            )
        return ExpertParallelState()
    key = (id(dist.group.WORLD), world, pp, ep, etp)
    if key in _CACHE:
        return _CACHE[key]
    stage_size = world // pp
    if stage_size % (ep * etp) != 0:
        fail(
            f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} does not divide the "
            f"{stage_size} ranks of a pipeline stage"
        )
    edp = stage_size // (ep * etp)
    rank = dist.get_rank()
    mine: dict[str, dist.ProcessGroup] = {}

    def make(name: str, members_of) -> None:
        # new_group is collective over the world: every rank creates every group in the same order.
        for stage in range(pp):
            base = stage * stage_size
            for ranks in members_of():
                ranks = [base + r for r in ranks]
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[name] = group

    def local(etp_r: int, ep_r: int, edp_r: int) -> int:
        return etp_r + etp * (ep_r + ep * edp_r)

    make("ep", lambda: [[local(t, e, d) for e in range(ep)] for d in range(edp) for t in range(etp)])
    make("etp", lambda: [[local(t, e, d) for t in range(etp)] for d in range(edp) for e in range(ep)])
    make("tp_ep", lambda: [[local(t, e, d) for e in range(ep) for t in range(etp)] for d in range(edp)])
    make("edp", lambda: [[local(t, e, d) for d in range(edp)] for e in range(ep) for t in range(etp)])
    r = rank % stage_size
    state = ExpertParallelState(
        ep_size=ep,
        ep_rank=(r // etp) % ep,
        etp_size=etp,
        etp_rank=r % etp,
        edp_size=edp,
        dp_size=pstate.dp_size,
        ep_group=mine["ep"],
        etp_group=mine["etp"],
        tp_ep_group=mine["tp_ep"],
        edp_group=mine["edp"],
    )
    _CACHE[key] = state
    return state


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """all_to_all_single along dim 0 with autograd (the gradient goes back with the splits swapped)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (output_splits, input_splits, group)
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits, group = ctx.splits
        return _all_to_all(grad.contiguous(), input_splits, output_splits, group), None, None, None


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def gather_variable(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's x (rank i has sizes[i] rows) in rank order; the gradient is summed back
    to its owner (a variable-size all-gather / reduce-scatter pair, built on all_to_all_single)."""
    return _GatherVariable.apply(x, sizes, group)


class _GatherVariable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        world = len(sizes)
        return _all_to_all(x.repeat(world, *[1] * (x.dim() - 1)), sizes, [x.shape[0]] * world, group)

    @staticmethod
    def backward(ctx, grad):
        return scatter_sum_variable(grad.contiguous(), ctx.sizes, ctx.group), None, None


def scatter_sum_variable(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """The adjoint of gather_variable: rank i receives the sum over ranks of their rows of chunk i."""
    world, rank = len(sizes), dist.get_rank(group)
    received = _all_to_all(x, [sizes[rank]] * world, sizes, group)
    return received.view(world, sizes[rank], *x.shape[1:]).sum(dim=0)


class _ScatterSumVariable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return scatter_sum_variable(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        world = len(ctx.sizes)
        out = _all_to_all(
            grad.repeat(world, *[1] * (grad.dim() - 1)), ctx.sizes, [grad.shape[0]] * world, ctx.group
        )
        return out, None, None


def reduce_scatter_variable(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Sum the ranks' [sum(sizes), ...] tensors and keep this rank's rows (autograd: gather back)."""
    return _ScatterSumVariable.apply(x, sizes, group)
