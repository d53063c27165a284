"""Rotary position embeddings (RoPE): cos/sin tables from position ids and their application to q and k."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class YarnScaling:
    """YaRN's settings, as Megatron's YarnRotaryEmbedding takes them."""

    scaling_factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    correction_range_round_to_int: bool = True


# What --enable-gpt-oss sets (Megatron's ModelOpt GPT builder, "based on HuggingFace GPT-OSS configurations").
GPT_OSS_YARN = YarnScaling(32.0, 131072, 32.0, 1.0, 1.0, 0.0, False)


def yarn_scaling(cfg: Any) -> YarnScaling | None:
    """The YaRN settings cfg asks for (--enable-gpt-oss), or None for plain RoPE."""
    return GPT_OSS_YARN if getattr(cfg, "enable_gpt_oss", False) else None


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_positions: int) -> float:
    """The channel index whose wavelength makes `num_rotations` turns over `max_positions` positions."""
    return (dim * math.log(max_positions / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, yarn: YarnScaling) -> tuple[torch.Tensor, float]:
    """YaRN's [dim/2] fp32 inverse frequencies and its concentration factor (the scale on cos and sin), as
    Megatron's YarnRotaryEmbedding: channels below the correction range keep base^(-2i/d), those above it
    are divided by the factor, with a linear ramp between."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extra = 1.0 / (base**exponents)
    inter = 1.0 / (yarn.scaling_factor * base**exponents)
    low = _yarn_correction_dim(yarn.beta_fast, dim, base, yarn.original_max_position_embeddings)
    high = _yarn_correction_dim(yarn.beta_slow, dim, base, yarn.original_max_position_embeddings)
    if yarn.correction_range_round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # Megatron's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency
    inv_freq = inter * (1 - extrapolation) + extra * extrapolation
    concentration = _yarn_mscale(yarn.scaling_factor, yarn.mscale) / _yarn_mscale(
        yarn.scaling_factor, yarn.mscale_all_dim
    )
    return inv_freq, float(concentration)


class RotaryEmbedding(nn.Module):
    """cos/sin of position x inverse frequency for the first rotary_percent of each head's channels.

    Layout: rotate-half by default, as Megatron (channel i pairs with i + dim/2); with rotary_interleaved,
    channel 2i pairs with 2i + 1. seq_len_interpolation_factor divides every position (linear position
    interpolation); rope_scaling applies Llama 3.1's frequency scaling with rope_scaling_factor; yarn
    replaces the frequencies with YaRN's and scales cos and sin by its concentration factor (so q.k by
    its square), as Megatron's YarnRotaryEmbedding with its mscale in apply_rotary_pos_emb.
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
        yarn: YarnScaling | None = None,
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
        self.yarn = yarn
        self.mscale = 1.0
        if yarn is not None:
            inv_freq, self.mscale = yarn_inv_freq(self.dim, self.base, yarn)
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
        if self.mscale != 1.0:
            return angles.cos() * self.mscale, angles.sin() * self.mscale
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        extras = [f"dim={self.dim}", f"base={self.base}"]
        if self.rotary_interleaved:
            extras.append("interleaved")
        if self.seq_len_interpolation_factor is not None:
            extras.append(f"seq_len_interpolation_factor={self.seq_len_interpolation_factor}")
        if self.rope_scaling:
            extras.append("llama3 scaling")
        if self.yarn is not None:
            extras.append(f"yarn factor={self.yarn.scaling_factor}, mscale={self.mscale:.4f}")
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
