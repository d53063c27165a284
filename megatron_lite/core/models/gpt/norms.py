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

# A norm's weights are replicated over TP ranks, but its gradient is partial when each rank normalizes
# only part of the data: its slice of the sequence under sequence parallelism, or its own heads for the
# per-head q/k norms of --qk-layernorm. Passing the weights through copy_to_tp (identity forward,
# all-reduce backward) sums the partial gradients over the TP group inside backward: every rank ends with
# the full gradient and no extra reduction step is needed outside the model (Megatron sums the same
# gradients in finalize_model_grads).


class _Norm(nn.Module):
    """What both norms share: eps, a replicated weight, and the TP sum of partial gradients.

    zero_centered_gamma (--apply-layernorm-1p): the weight w starts at 0 and the norm scales by 1 + w, so
    weight decay pulls the scale towards 1 rather than 0. The stored tensor is w, as in Megatron.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        grad_sum_group: dist.ProcessGroup | None = None,
        zero_centered_gamma: bool = False,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.grad_sum_group = grad_sum_group
        self.zero_centered_gamma = zero_centered_gamma
        init = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(init(hidden_size))
        set_tensor_model_parallel_attributes(self.weight, False)

    def _grad_summed(self, param: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(param, self.grad_sum_group)

    def scale(self) -> torch.Tensor:
        """The factor the normalized input is multiplied by: weight, or 1 + weight when zero-centred."""
        weight = self._grad_summed(self.weight)
        return weight + 1 if self.zero_centered_gamma else weight

    def extra_repr(self) -> str:
        centred = ", zero_centered_gamma=True" if self.zero_centered_gamma else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{centred}"


class LayerNorm(_Norm):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        grad_sum_group: dist.ProcessGroup | None = None,
        zero_centered_gamma: bool = False,
    ) -> None:
        super().__init__(hidden_size, eps, grad_sum_group, zero_centered_gamma)
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        set_tensor_model_parallel_attributes(self.bias, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.scale(), self._grad_summed(self.bias), self.eps)


class RMSNorm(_Norm):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x enters through one op (a cast, or a free view in fp32), so its gradient leaves the norm as one
        # sum: the same sum, to the bit, as when --recompute-modules layernorm reruns the norm apart.
        x32 = x.float() if x.dtype != torch.float32 else x.view_as(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.scale().float()).to(x.dtype)


def build_norm(
    cfg: MegatronConfig,
    tp_group: dist.ProcessGroup | None = None,
    hidden_size: int | None = None,
    per_head: bool = False,
) -> nn.Module:
    """The norm cfg.normalization names, with cfg.layernorm_epsilon and --apply-layernorm-1p, over
    hidden_size (default cfg.hidden_size). per_head: a q/k norm that sees only this rank's heads, whose
    gradient is summed over TP whether or not the sequence is parallel."""
    group = tp_group if (cfg.sequence_parallel or per_head) else None
    size = cfg.hidden_size if hidden_size is None else hidden_size
    norm_class = RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm
    return norm_class(size, cfg.layernorm_epsilon, group, cfg.layernorm_zero_centered_gamma)
