"""The feed-forward block: fc1 (column-parallel) -> activation (GELU, SwiGLU, quick GeGLU, squared ReLU) -> fc2
(row-parallel)."""

from __future__ import annotations

import functools
from collections.abc import Callable

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


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, x * Phi(x) with the normal CDF: Megatron core's default activation."""
    return F.gelu(x)


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (--openai-gelu; GPT-2's "gelu_new")."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (--squared-relu)."""
    return F.relu(x).square()


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """[gate; up] [..., 2 * ffn] -> silu(gate) * up [..., ffn] (--swiglu)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), GELU's sigmoid approximation (gpt-oss's gate activation)."""
    return x * torch.sigmoid(1.702 * x)


def glu(
    x: torch.Tensor,
    gate_activation: Callable[[torch.Tensor], torch.Tensor],
    linear_offset: float = 0.0,
    clamp_value: float | None = None,
) -> torch.Tensor:
    """Megatron's gated unit: [gate; up] [..., 2 * ffn] -> act(gate) * (up + linear_offset) [..., ffn], with
    gate clamped to <= clamp_value and up to [-clamp_value, clamp_value] first when clamp_value is set."""
    gate, up = x.chunk(2, dim=-1)
    if clamp_value is not None:
        gate = gate.clamp(max=clamp_value)
        up = up.clamp(min=-clamp_value, max=clamp_value)
    if linear_offset != 0.0:
        up = up + linear_offset
    return gate_activation(gate) * up


def activation_func(cfg: MegatronConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation cfg picks, as Megatron: --swiglu, else --squared-relu, else --quick-geglu, else GELU
    (exact, or tanh with --openai-gelu). The gated ones take --glu-linear-offset and
    --activation-func-clamp-value; plain SwiGLU keeps its own function (the default path unchanged)."""
    if cfg.gated_linear_unit:
        gate = F.silu if cfg.swiglu else quick_gelu
        if cfg.swiglu and cfg.glu_linear_offset == 0.0 and cfg.activation_func_clamp_value is None:
            return swiglu
        fn = functools.partial(
            glu,
            gate_activation=gate,
            linear_offset=cfg.glu_linear_offset,
            clamp_value=cfg.activation_func_clamp_value,
        )
        fn.__name__ = "swiglu" if cfg.swiglu else "quick_geglu"
        return fn
    if cfg.squared_relu:
        return squared_relu
    return openai_gelu if cfg.openai_gelu else gelu


class MLP(nn.Module):
    """fc2(act(fc1(x))); gated (SwiGLU, quick GeGLU) fc1 outputs [gate; up] (2 x ffn) and act is
    act(gate) * (up + offset).

    The full fc1 weight is [gate; up]; with stride 2 each TP rank's shard is [gate_r; up_r], the
    matching halves for its slice of the ffn dimension, so the activation needs no communication.
    """

    def __init__(self, cfg: MegatronConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.activation_func = activation_func(cfg)
        self.linear_fc1 = ColumnParallelLinear(
            cfg.hidden_size,
            cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1),
            init_method=init_method_normal(cfg.init_method_std),
            bias=cfg.add_bias_linear,
            tp_group=tp_group,
            sequence_parallel=cfg.sequence_parallel,
            stride=2 if cfg.gated_linear_unit else 1,
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
        intermediate, _ = self.linear_fc1(hidden)  # [s, b, ffn/tp] (x2 when gated)
        out, _ = self.linear_fc2(self.activation_func(intermediate))  # activation: [s, b, ffn/tp]
        return out

    def extra_repr(self) -> str:
        return f"activation={self.activation_func.__name__}"
