"""Normalization layers (LayerNorm, RMSNorm) and the one place that picks between them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)

# Under sequence parallelism a norm sees only this rank's slice of the sequence, so its weight gradient
# is partial. Passing the weights through copy_to_tp (identity forward, all-reduce backward) sums the
# partial gradients over the TP group inside backward: every rank ends with the full gradient and no
# extra reduction step is needed outside the model.


class _Norm(nn.Module):
    """What both norms share: eps, a replicated weight of ones, and the sequence-parallel gradient sum."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, sequence_parallel_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.sequence_parallel_group = sequence_parallel_group
        self.weight = nn.Parameter(torch.ones(hidden_size))
        set_tensor_model_parallel_attributes(self.weight, False)

    def _grad_summed(self, param: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(param, self.sequence_parallel_group)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(_Norm):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, sequence_parallel_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__(hidden_size, eps, sequence_parallel_group)
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        set_tensor_model_parallel_attributes(self.bias, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._grad_summed(self.weight), self._grad_summed(self.bias)
        return F.layer_norm(x, weight.shape, weight, bias, self.eps)


class RMSNorm(_Norm):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._grad_summed(self.weight)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * weight.float()).to(x.dtype)


def build_norm(cfg: MegatronConfig, tp_group: dist.ProcessGroup | None = None) -> nn.Module:
    """The norm cfg.normalization names, over cfg.hidden_size with cfg.layernorm_epsilon."""
    sp_group = tp_group if cfg.sequence_parallel else None
    if cfg.normalization == "RMSNorm":
        return RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, sp_group)
    return LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, sp_group)
