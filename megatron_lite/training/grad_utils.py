"""Gradient norm and clipping that are correct under tensor and pipeline parallelism, and fp16 loss scaling."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite.parallel_state import ParallelState


def _is_tp_sharded(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _is_not_shared(param: torch.nn.Parameter) -> bool:
    """False for the last pipeline stage's copy of the tied word embeddings: the first stage's counts."""
    return not getattr(param, "shared", False)


def _norm_squared(
    sharded: list[torch.Tensor],
    replicated: list[torch.Tensor],
    pstate: ParallelState,
    experts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared L2 norm over TP-sharded tensors (summed over the TP group) and replicated ones (counted once),
    plus the routed experts' squares (already summed over their group), summed over pipeline stages."""
    device = next((t.device for t in sharded + replicated), pstate.device)
    totals = []
    for tensors in (sharded, replicated):
        if tensors:
            norms = torch._foreach_norm([t.float() for t in tensors])
            totals.append(torch.stack(norms).square().sum())
        else:
            totals.append(torch.zeros((), dtype=torch.float32, device=device))
    sharded_sq, replicated_sq = totals
    if pstate.tp_size > 1:
        dist.all_reduce(sharded_sq, group=pstate.tp_group)
    total = sharded_sq + replicated_sq
    if experts is not None:
        # Added before the stages' sum: a stage without MoE layers joins the same one collective.
        total = total + experts
    if pstate.pp_size > 1:
        # Each stage holds different layers: their squares add up.
        dist.all_reduce(total, group=pstate.pp_group)
    return total


def grad_norm_squared(
    parameters: Iterable[torch.nn.Parameter], pstate: ParallelState | None = None
) -> torch.Tensor:
    """Squared L2 norm of all gradients of the full (unsharded) model, as an fp32 0-d tensor.

    TP-sharded parameters hold different slices on each TP rank, so their squares are summed over the
    TP group; replicated parameters hold the same gradient on every TP rank and are counted once.
    Gradients are already identical across DP ranks (DDP averaged them), so DP needs no reduction.
    """
    params = [p for p in parameters if p.grad is not None and _is_not_shared(p)]
    experts = [p for p in params if _is_expert(p)]
    params = [p for p in params if not _is_expert(p)]
    pstate = pstate or ParallelState()
    return _norm_squared(
        [p.grad for p in params if _is_tp_sharded(p)],
        [p.grad for p in params if not _is_tp_sharded(p)],
        pstate,
        _expert_norm_squared(experts, [p.grad for p in experts], pstate),
    )


def _is_expert(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "is_expert", False))


def _expert_norm_squared(
    params: list[torch.nn.Parameter], tensors: list[torch.Tensor], pstate: ParallelState
) -> torch.Tensor:
    """Routed experts (MoE): each slice of each expert lives on one rank of the expert-TP x EP group, so
    their squares are summed over that group (the pipeline stages' sum follows in _norm_squared)."""
    if not params:
        return torch.zeros((), dtype=torch.float32, device=pstate.device)
    group = getattr(params[0], "expert_norm_group", None)
    total = torch.stack(torch._foreach_norm([t.float() for t in tensors])).square().sum()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total


def micro_batch_loss_weights(
    num_tokens: torch.Tensor, calculate_per_token_loss: bool, pstate: ParallelState
) -> torch.Tensor:
    """Each micro batch's factor on its summed loss, from its non-masked token counts [n] (Megatron's
    normalisation, token counts clamped to 1).

    Default: 1 / (its own tokens x number of micro batches); DDP then averages over the DP ranks. With
    --calculate-per-token-loss: 1 / the tokens of the whole global batch (all micro batches, summed over
    the DP ranks), times the DP size that DDP's average divides by, so the gradient is the global
    token mean.
    """
    if not calculate_per_token_loss:
        if pstate.cp_size > 1:
            # Context parallelism: a micro batch's tokens are spread over the CP ranks. Its mean is over
            # all of them, and DDP's average over DP x CP divides by CP once more: give it back.
            num_tokens = num_tokens.clone()
            dist.all_reduce(num_tokens, group=pstate.cp_group)
            return pstate.cp_size / (num_tokens.clamp(min=1) * len(num_tokens))
        return 1.0 / (num_tokens.clamp(min=1) * len(num_tokens))
    total = num_tokens.sum()
    if pstate.grad_size > 1:
        dist.all_reduce(total, group=pstate.grad_group)
    return (pstate.grad_size / total.clamp(min=1)).expand(len(num_tokens))


def all_reduce_gradients(
    parameters: Iterable[torch.nn.Parameter],
    pstate: ParallelState,
    bucket_numel: int = 40_000_000,
) -> None:
    """Average the gradients over the data-parallel ranks after backward (--overlap-grad-reduce off).

    Megatron without the overlap reduces its gradient buffer after the whole backward pass; here the
    gradients are packed per dtype into flat buckets of at most `bucket_numel` elements (Megatron's
    default bucket size), each divided by the DP size (before the sum, as torch's DDP) and all-reduced.
    """
    if pstate.grad_size <= 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        for bucket in _buckets(grads, bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket]).div_(pstate.grad_size)
            dist.all_reduce(flat, group=pstate.grad_group)
            for grad, chunk in zip(bucket, torch.split(flat, [g.numel() for g in bucket])):
                grad.copy_(chunk.view_as(grad))


def _buckets(tensors: list[torch.Tensor], bucket_numel: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of tensors of at most bucket_numel elements (a larger tensor is a bucket alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and size + tensor.numel() > bucket_numel:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def params_norm(parameters: Iterable[torch.nn.Parameter], pstate: ParallelState | None = None) -> float:
    """L2 norm of the full model's parameters (--log-params-norm), counting TP shards the same way."""
    params = [p for p in parameters if _is_not_shared(p)]
    experts = [p for p in params if _is_expert(p)]
    params = [p for p in params if not _is_expert(p)]
    pstate = pstate or ParallelState()
    squared = _norm_squared(
        [p.detach() for p in params if _is_tp_sharded(p)],
        [p.detach() for p in params if not _is_tp_sharded(p)],
        pstate,
        _expert_norm_squared(experts, [p.detach() for p in experts], pstate),
    )
    return math.sqrt(squared.item())


def clip_grad_norm(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, pstate: ParallelState | None = None
) -> float:
    """Scale all gradients so their global norm is at most max_norm (0 = no clipping); returns the norm
    before clipping. A non-finite norm is returned as is and the gradients are left alone."""
    params = [p for p in parameters if p.grad is not None]
    total = math.sqrt(grad_norm_squared(params, pstate).item())
    if max_norm > 0 and math.isfinite(total):
        coeff = max_norm / (total + 1.0e-6)
        if coeff < 1.0:
            torch._foreach_mul_([p.grad for p in params], coeff)
    return total


class LossScaler:
    """Loss scale for fp16: static (--loss-scale) or dynamic with Megatron's hysteresis.

    Dynamic: every overflow uses up one unit of hysteresis; once it is used up, each further overflow
    halves the scale (not below --min-loss-scale). After --loss-scale-window overflow-free iterations
    in a row the scale doubles and the hysteresis is refilled. bf16 and fp32 use a fixed scale of 1.
    """

    def __init__(
        self,
        initial_scale: float = 1.0,
        *,
        dynamic: bool = False,
        min_scale: float = 1.0,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ) -> None:
        self.scale = float(initial_scale)
        self.dynamic = dynamic
        self.min_scale = float(min_scale)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @classmethod
    def from_config(cls, cfg: Any) -> LossScaler:
        if not cfg.fp16:
            return cls(1.0)
        if cfg.loss_scale is not None:
            return cls(cfg.loss_scale)
        return cls(
            cfg.initial_loss_scale,
            dynamic=True,
            min_scale=cfg.min_loss_scale,
            growth_interval=int(cfg.loss_scale_window),
            hysteresis=cfg.hysteresis,
        )

    @property
    def at_minimum(self) -> bool:
        """True when an overflow can no longer be cured by a smaller scale."""
        return not self.dynamic or self.scale <= self.min_scale

    def unscale_(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.scale == 1.0:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])
