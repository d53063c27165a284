"""The feed-forward block: fc1 (column-parallel) -> tanh-GELU or SwiGLU -> fc2 (row-parallel)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    init_method_normal,
    scaled_init_method_normal,
)


class MLP(nn.Module):
    """fc2(act(fc1(x))); with SwiGLU fc1 outputs [gate; up] (2 x ffn) and act is silu(gate) * up.

    The full fc1 weight is [gate; up]; with stride 2 each TP rank's shard is [gate_r; up_r], the
    matching halves for its slice of the ffn dimension, so the activation needs no communication.
    """

    def __init__(self, cfg: MegatronConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.swiglu = cfg.swiglu
        self.linear_fc1 = ColumnParallelLinear(
            cfg.hidden_size,
            cfg.ffn_hidden_size * (2 if cfg.swiglu else 1),
            init_method=init_method_normal(cfg.init_method_std),
            bias=cfg.add_bias_linear,
            tp_group=tp_group,
            sequence_parallel=cfg.sequence_parallel,
            stride=2 if cfg.swiglu else 1,
        )
        self.linear_fc2 = RowParallelLinear(
            cfg.ffn_hidden_size,
            cfg.hidden_size,
            init_method=scaled_init_method_normal(cfg.init_method_std, cfg.num_layers),
            bias=cfg.add_bias_linear,
            input_is_parallel=True,
            tp_group=tp_group,
            sequence_parallel=cfg.sequence_parallel,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] ([s/tp, b, h] under sequence parallelism) -> same shape."""
        intermediate, _ = self.linear_fc1(hidden)  # [s, b, ffn/tp] (x2 with SwiGLU)
        if self.swiglu:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = F.silu(gate) * up
        else:
            intermediate = F.gelu(intermediate, approximate="tanh")
        out, _ = self.linear_fc2(intermediate)
        return out
