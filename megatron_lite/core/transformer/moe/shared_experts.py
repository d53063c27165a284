"""Shared experts: a dense MLP every token passes through beside the routed experts, optionally scaled by
a sigmoid gate (Qwen2-MoE's shared_expert_gate; Megatron's --moe-shared-expert-gate)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.tensor_parallel import init_method_normal
from megatron_lite.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region


class SharedExpertMLP(MLP):
    """An MLP of ffn size --moe-shared-expert-intermediate-size, tensor-parallel like the dense MLP; with
    the gate, output = sigmoid(x @ gate_weight^T) * mlp(x), gate_weight [1, h]."""

    def __init__(self, cfg, tp_group: dist.ProcessGroup | None = None) -> None:
        shared_cfg = dataclasses.replace(cfg, ffn_hidden_size=cfg.moe_shared_expert_intermediate_size)
        super().__init__(shared_cfg, tp_group)
        self.use_gate = cfg.moe_shared_expert_gate
        # Under sequence parallelism each TP rank gates its own tokens: the gate's gradient is summed.
        self.gate_group = tp_group if cfg.sequence_parallel else None
        if self.use_gate:
            self.gate_weight = nn.Parameter(torch.empty(1, cfg.hidden_size))
            init_method_normal(cfg.init_method_std)(self.gate_weight)
        else:
            self.gate_weight = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden)
        if self.gate_weight is not None:
            gate = copy_to_tensor_model_parallel_region(self.gate_weight, self.gate_group)
            out = out * torch.sigmoid(F.linear(hidden, gate))
        return out
