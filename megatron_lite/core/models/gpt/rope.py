"""Rotary position embeddings (RoPE): cos/sin tables from position ids and their application to q and k."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.errors import fail

# Megatron's --use-rope-scaling hard-codes Llama 3.1's other frequency-scaling constants.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_MAX_POSITIONS = 8192


def llama3_scaled_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float = LLAMA3_LOW_FREQ_FACTOR,
    high_freq_factor: float = LLAMA3_HIGH_FREQ_FACTOR,
    original_max_positions: int = LLAMA3_ORIGINAL_MAX_POSITIONS,
) -> torch.Tensor:
    """Llama 3.1's frequency scaling: wavelengths shorter than original/high_freq_factor are kept, those
    longer than original/low_freq_factor are stretched by `factor`, and the band between blends the two."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    stretched = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, stretched)


class RotaryEmbedding(nn.Module):
    """cos/sin of position x inverse frequency for the first rotary_percent of each head's channels.

    Layout: rotate-half by default, as Megatron (channel i pairs with i + dim/2); with rotary_interleaved,
    channel 2i pairs with 2i + 1. seq_len_interpolation_factor divides every position (linear position
    interpolation); rope_scaling applies Llama 3.1's frequency scaling with rope_scaling_factor.
    No parameters or buffers; the tables are computed from the position ids given, so they follow any
    position layout (offsets from a KV cache, positions reset at document boundaries).
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_base: float = 10000.0,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: float | None = None,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
    ) -> None:
        super().__init__()
        self.dim = int(kv_channels * rotary_percent)
        if self.dim <= 0 or self.dim % 2 != 0:
            fail(
                f"--rotary-percent {rotary_percent} of head size {kv_channels} gives {self.dim} rotary "
                "channels; it must be a positive even number"
            )
        self.base = float(rotary_base)
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        self.rope_scaling = rope_scaling
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (self.base**exponents)  # [dim/2]
        if rope_scaling:
            inv_freq = llama3_scaled_inv_freq(inv_freq, rope_scaling_factor)
        self._inv_freq = {inv_freq.device: inv_freq}  # per device; not a buffer, so not in checkpoints

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The [dim/2] fp32 inverse frequencies, on `device`."""
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> (cos, sin), each [s, b, 1, dim] fp32."""
        positions = position_ids.t().float()  # [s, b]
        if self.seq_len_interpolation_factor is not None:
            positions = positions * (1 / self.seq_len_interpolation_factor)  # Megatron's rounding
        angles = positions.unsqueeze(-1) * self.inv_freq(position_ids.device)  # [s, b, dim/2]
        if self.rotary_interleaved:
            angles = angles.repeat_interleave(2, dim=-1)  # [f0, f0, f1, f1, ...]
        else:
            angles = torch.cat((angles, angles), dim=-1)  # [f0, f1, ..., f0, f1, ...]
        angles = angles.unsqueeze(2)  # [s, b, 1, dim]
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        extras = [f"dim={self.dim}", f"base={self.base}"]
        if self.rotary_interleaved:
            extras.append("interleaved")
        if self.seq_len_interpolation_factor is not None:
            extras.append(f"seq_len_interpolation_factor={self.seq_len_interpolation_factor}")
        if self.rope_scaling:
            extras.append("llama3 scaling")
        return ", ".join(extras)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The partner of each channel with the sine's sign: (-x2, x1) for each rotated pair (x1, x2)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [s, b, heads, head_dim]; the rest pass through.
    interleaved must match the RotaryEmbedding that made cos and sin."""
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    rotated = (x_rot.float() * cos + _rotate_half(x_rot.float(), interleaved) * sin).to(x.dtype)
    if x_pass.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, x_pass), dim=-1)
