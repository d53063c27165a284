"""Megatron's TopKRouter: gating logits, z-loss, top-k routing (softmax/sigmoid, groups, expert bias),
capacity dropping, and the load-balancing losses attached to the routing probabilities."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.config.moe_checks import aux_loss_coeff
from megatron_lite.core.tensor_parallel import init_method_normal
from megatron_lite.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_lite.core.transformer.moe import aux_losses
from megatron_lite.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class TopKRouter(nn.Module):
    """weight [E, h] (fp32, Megatron's init) and, with bias-linear, bias [E]; forward(hidden [s, b, h]) ->
    (probs [s*b, E], routing_map [s*b, E]).

    Under sequence parallelism each TP rank routes its own tokens: the weight's gradient is summed over
    the TP group, token counts of the balancing loss are summed over it, and the z-loss coefficient is
    divided by its size, as in Megatron.
    """

    def __init__(self, cfg, layer_number: int, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_number = layer_number  # 1-based, Megatron's tracker index
        self.num_experts = cfg.num_experts
        self.topk = cfg.moe_router_topk
        self.tp_group = tp_group if cfg.sequence_parallel else None
        self.tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        init_method_normal(cfg.init_method_std)(self.weight)
        self.bias = None
        if cfg.add_bias_linear:
            self.bias = nn.Parameter(torch.empty(cfg.num_experts, dtype=torch.float32))
            init_method_normal(cfg.init_method_std)(self.bias)
        self.enable_expert_bias = cfg.moe_router_enable_expert_bias
        if self.enable_expert_bias:
            # expert_bias is state (saved); the token counts collect over a step's micro batches.
            self.register_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        else:
            self.local_tokens_per_expert = None
            self.expert_bias = None
        if aux_loss_coeff(cfg, "global_aux_loss") > 0:
            self.register_buffer("global_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
            self.register_buffer("ga_steps", torch.tensor(0.0), persistent=False)
        else:
            self.global_tokens_per_expert = None
        self.dp_group = None  # set by the model for global_aux_loss (tokens counted over TP x DP)

    # ---- gating ----------------------------------------------------------------------------------
    def gating(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [s, b, E] in --moe-router-dtype (default: the dtype the input is computed in)."""
        device = hidden.device.type
        dtype = _ROUTER_DTYPES.get(self.cfg.moe_router_dtype)
        if dtype is None:
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        weight = copy_to_tensor_model_parallel_region(self.weight, self.tp_group)
        bias = (
            copy_to_tensor_model_parallel_region(self.bias, self.tp_group) if self.bias is not None else None
        )
        with torch.autocast(device, enabled=False):
            return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    # ---- losses ----------------------------------------------------------------------------------
    def _training(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def apply_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        coeff = self.cfg.moe_z_loss_coeff
        if coeff is None or not self._training():
            return logits
        coeff = coeff / self.tp_size
        z_loss = z_loss_func(logits, coeff)
        logits = MoEAuxLossAutoScaler.apply(logits, self._per_token(z_loss, logits.shape[0]))
        aux_losses.save("z_loss", z_loss / coeff, self.layer_number, self.cfg.num_layers)
        return logits

    def _per_token(self, loss: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """With --calculate-per-token-loss the gradient is later divided by the token count: Megatron
        multiplies the auxiliary loss by the local tokens so its effective scale stays the same."""
        return loss * num_tokens if self.cfg.calculate_per_token_loss else loss

    def _tokens_per_expert(self, routing_map: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        counts = routing_map.sum(dim=0).float()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        return counts

    def _balancing_losses(
        self, probs: torch.Tensor, logits: torch.Tensor, seq_length: int, bsz: int
    ) -> torch.Tensor:
        cfg, k, e = self.cfg, self.topk, self.num_experts
        types = {t: aux_loss_coeff(cfg, t) for t in ("aux_loss", "seq_aux_loss", "global_aux_loss")}
        if not any(c > 0 for c in types.values()):
            return probs
        routing_map, scores = compute_routing_scores_for_aux_loss(logits, k, cfg.moe_router_score_function)
        local = routing_map.shape[0]
        if types["aux_loss"] > 0:
            coeff = types["aux_loss"]
            counts = self._tokens_per_expert(routing_map, self.tp_group)
            loss = switch_load_balancing_loss_func(scores, counts, local * self.tp_size, k, e, coeff)
            probs = self._attach(probs, loss, coeff, "load_balancing_loss", local)
        if types["seq_aux_loss"] > 0:
            # Each sequence as its own batch: fold the batch into the expert axis, then average.
            coeff = types["seq_aux_loss"]
            seq_map, seq_scores = routing_map.reshape(seq_length, -1), scores.reshape(seq_length, -1)
            counts = self._tokens_per_expert(seq_map, self.tp_group)
            loss = (
                switch_load_balancing_loss_func(seq_scores, counts, seq_length * self.tp_size, k, e, coeff)
                / bsz
            )
            probs = self._attach(probs, loss, coeff, "seq_load_balancing_loss", local)
        if types["global_aux_loss"] > 0:
            coeff = types["global_aux_loss"]
            group_size = self.tp_size * (
                dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
            )
            counts = self._tokens_per_expert(routing_map, self.tp_group)
            if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
                dist.all_reduce(counts, group=self.dp_group)
            if not aux_losses.in_recompute():  # recompute sees the same micro batch again
                self.global_tokens_per_expert += counts
                self.ga_steps += 1
            averaged = self.global_tokens_per_expert / self.ga_steps
            loss = switch_load_balancing_loss_func(scores, averaged, local * group_size, k, e, coeff)
            probs = self._attach(probs, loss, coeff, "global_load_balancing_loss", local, has_dp=True)
        return probs

    def _attach(
        self,
        probs: torch.Tensor,
        loss: torch.Tensor,
        coeff: float,
        name: str,
        tokens: int,
        has_dp: bool = False,
    ) -> torch.Tensor:
        aux_losses.save(
            name, loss / coeff, self.layer_number, self.cfg.num_layers, reduce_tp=True, reduce_has_dp=has_dp
        )
        return MoEAuxLossAutoScaler.apply(probs, self._per_token(loss, tokens))

    def reset_global_aux_loss_tracker(self) -> None:
        """Megatron resets the global-batch token counts after each optimizer step."""
        if self.global_tokens_per_expert is not None:
            self.global_tokens_per_expert.zero_()
            self.ga_steps.zero_()

    # ---- forward ---------------------------------------------------------------------------------
    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        seq_length, bsz = logits.shape[:2]
        logits = logits.reshape(-1, self.num_experts)
        logits = self.apply_z_loss(logits)
        probs, routing_map = topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=cfg.moe_router_pre_softmax,
            num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=cfg.moe_router_score_function,
            expert_bias=self.expert_bias,
        )
        if cfg.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=self.topk,
                capacity_factor=cfg.moe_expert_capacity_factor,
                drop_policy=cfg.moe_token_drop_policy,
                pad_to_capacity=cfg.moe_pad_expert_input_to_capacity,
            )
        if self._training():
            probs = self._balancing_losses(probs, logits, seq_length, bsz)
        if self.enable_expert_bias and torch.is_grad_enabled() and not aux_losses.in_recompute():
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.routing(self.gating(hidden))
