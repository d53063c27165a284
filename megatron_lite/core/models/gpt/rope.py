"""Rotary position embeddings (RoPE): cos/sin tables from position ids and their application to q and k."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.errors import fail


class RotaryEmbedding(nn.Module):
    """cos/sin of position x inverse frequency for the first rotary_percent of each head's channels.

    Non-interleaved (rotate-half) layout, as Megatron's default: channel i pairs with i + dim/2.
    No parameters or buffers; the tables are computed from the position ids given, so they follow any
    position layout (offsets from a KV cache, positions reset at document boundaries).
    """

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0, rotary_base: float = 10000.0) -> None:
        super().__init__()
        self.dim = int(kv_channels * rotary_percent)
        if self.dim <= 0 or self.dim % 2 != 0:
            fail(
                f"--rotary-percent {rotary_percent} of head size {kv_channels} gives {self.dim} rotary "
                "channels; it must be a positive even number"
            )
        self.base = float(rotary_base)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> (cos, sin), each [s, b, 1, dim] fp32."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device) / self.dim
        inv_freq = 1.0 / (self.base**exponents)  # [dim/2]
        angles = position_ids.t().float().unsqueeze(-1) * inv_freq  # [s, b, dim/2]
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [s, b, 1, dim]
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [s, b, heads, head_dim]; the rest pass through."""
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    rotated = (x_rot.float() * cos + _rotate_half(x_rot.float()) * sin).to(x.dtype)
    if x_pass.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, x_pass), dim=-1)
