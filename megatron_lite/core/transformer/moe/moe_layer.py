"""The MoE layer that replaces a transformer layer's MLP: shared experts, router, dispatch, local experts,
combine (Megatron's MoELayer, with its parameter names)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.core.transformer.moe.experts import Experts
from megatron_lite.core.transformer.moe.parallel import ExpertParallelState
from megatron_lite.core.transformer.moe.router import TopKRouter
from megatron_lite.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron_lite.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


class MoELayer(nn.Module):
    """hidden [s, b, h] ([s/tp, b, h] under sequence parallelism) -> same shape.

    Submodules: router (TopKRouter), experts (this rank's num_experts / EP experts), shared_experts
    (with --moe-shared-expert-intermediate-size). The last step's tokens per local expert are kept in
    `tokens_per_expert` for logging.
    """

    def __init__(
        self,
        cfg,
        layer_number: int,
        tp_group: dist.ProcessGroup | None = None,
        ep: ExpertParallelState | None = None,
    ) -> None:
        super().__init__()
        ep = ep if ep is not None else ExpertParallelState()
        self.config = cfg
        self.layer_number = layer_number
        self.num_local_experts = cfg.num_experts // ep.ep_size
        offset = ep.ep_rank * self.num_local_experts
        self.local_expert_indices = list(range(offset, offset + self.num_local_experts))
        # Build order fixes the draws from the default generator: router, experts, shared experts.
        self.router = TopKRouter(cfg, layer_number + 1, tp_group)
        self.experts = Experts(cfg, self.num_local_experts, offset, ep.etp_rank, ep.etp_size)
        for param in self.experts.parameters():
            param.expert_norm_group = ep.tp_ep_group  # norms sum over the ranks holding other experts
        self.shared_experts = (
            SharedExpertMLP(cfg, tp_group) if cfg.moe_shared_expert_intermediate_size is not None else None
        )
        dispatcher = (
            MoEAlltoAllTokenDispatcher
            if cfg.moe_token_dispatcher_type == "alltoall"
            else MoEAllGatherTokenDispatcher
        )
        self.token_dispatcher = dispatcher(cfg.num_experts, self.local_expert_indices, ep)
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        shared = self.shared_experts(hidden) if self.shared_experts is not None else None
        probs, routing_map = self.router(hidden)
        tokens, counts, permuted_probs = self.token_dispatcher.dispatch(
            hidden.reshape(-1, shape[-1]), probs, routing_map
        )
        self.tokens_per_expert = torch.tensor(counts)
        expert_output = self.experts(tokens, counts, permuted_probs)
        output = self.token_dispatcher.combine(expert_output).view(shape)
        if shared is not None:
            output = output + shared
        return output
