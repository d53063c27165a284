"""Incremental decoding support: the key/value cache, and the matrix-vector product a decoding step uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_lite.core.performance import FP32_MAX_RELATIVE_ERROR

# linear(x [..., in], weight [out, in], bias [out] | None) -> [..., out], as F.linear.
LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class KVCache:
    """Per-layer keys and values of the tokens seen so far, [max_seq_len, b, groups/tp, head_dim].

    `length` is the number of cached positions and the position offset of the next tokens. Layers write
    their new keys/values with update(); GPTModel advances the length once all layers have run. Buffers
    are allocated on first use with the dtype and device of the keys (bf16 under autocast). Meant for
    inference under torch.no_grad(). `decode_linear` is the matrix-vector product that single-token
    steps use for their projections (see select_decode_linear); `decode_plan` is where the model keeps
    what those steps look up once per cache.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        decode_linear: DecodeLinear | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.decode_linear = decode_linear or TORCH_LINEAR
        self.decode_plan: Any = None  # decode.DecodePlan, built on the first single-token step

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's new key/value [s_new, b, g, d] after the cached ones; return all of them."""
        end = self.length + key.shape[0]
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache holds {self.max_seq_len} positions; {self.length} cached + {key.shape[0]} new "
                "do not fit (build it with a larger max_seq_len)"
            )
        if key.shape[1] != self.batch_size:
            raise ValueError(f"KV cache was built for batch size {self.batch_size}, got {key.shape[1]}")
        if self.keys[layer] is None:
            # Keys and values may differ in head size (MLA's v_head_dim).
            shape = (self.max_seq_len, *key.shape[1:])
            self.keys[layer] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            value_shape = (self.max_seq_len, *value.shape[1:])
            self.values[layer] = torch.zeros(value_shape, dtype=value.dtype, device=value.device)
        keys, values = self.keys[layer], self.values[layer]
        keys[self.length : end] = key
        values[self.length : end] = value
        return keys[:end], values[:end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reset(self) -> None:
        """Forget the cached positions (the buffers are kept for reuse)."""
        self.length = 0


# ---- the matrix-vector product of a decoding step ----------------------------------------------------
# A decoding step at batch 1 multiplies every weight matrix by one vector: it reads all weights once and
# does two FLOPs per weight, so its speed is how fast a matrix-vector kernel streams the weights. On the
# AMD EPYC these were measured on, MKL's (what F.linear calls for fp32 on CPU) reached ~10 GB/s with one
# or two threads, oneDNN's ~10 GB/s with one thread and ~16 GB/s with two: 1.2x on a whole step of a
# 10M-parameter GPT and 1.6x at GPT-2 124M (benchmarks/bench_generate.py prints this ablation). Not
# measured on Intel CPUs, where MKL is tuned; decode_linear="torch" is the way back to F.linear. The
# choice is not timed at run time: a timing taken while other processes load the machine picked the
# wrong kernel for the rest of the process (one pass of oneDNN's two threads took 180 ms instead of 3).
# oneDNN's linear is a private torch op (the one torch.compile's CPU backend emits): onednn_available()
# checks that this build has it.


@dataclass(frozen=True)
class DecodeLinear:
    """A matrix-vector implementation for decoding steps and why it was chosen."""

    name: str
    linear: LinearFn
    description: str


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


TORCH_LINEAR = DecodeLinear("torch", F.linear, "decode linear: torch (F.linear)")
DECODE_LINEAR_POLICIES = ("auto", "torch", "onednn")
_AUTO_CHOICES: dict[str, DecodeLinear] = {}  # by fp32 matmul precision


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (a CPU build with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def select_decode_linear(weight: torch.Tensor, policy: str = "auto") -> DecodeLinear:
    """The matrix-vector product for single-token decoding steps of a model with weights like `weight`.

    "torch" is F.linear. "onednn" is oneDNN's linear (fp32 CPU weights only). "auto" is oneDNN's for
    fp32 weights on a CPU with oneDNN when its error against float64 on `weight` is fp32-level (checked
    once per process and fp32 matmul precision: oneDNN follows that setting, which may allow bf16
    arithmetic), and F.linear otherwise.
    """
    if policy not in DECODE_LINEAR_POLICIES:
        raise ValueError(f"decode linear {policy!r} is not one of {', '.join(DECODE_LINEAR_POLICIES)}")
    if policy == "torch":
        return TORCH_LINEAR
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available()
    if policy == "onednn":
        if not cpu_fp32:
            raise ValueError("the onednn decode linear needs fp32 weights on a CPU with oneDNN")
        return DecodeLinear("onednn", _onednn_linear, "decode linear: onednn (set explicitly)")
    if not cpu_fp32:
        return TORCH_LINEAR
    key = torch.get_float32_matmul_precision()
    if key not in _AUTO_CHOICES:
        _AUTO_CHOICES[key] = choose_decode_linear(_relative_error(_onednn_linear, weight))
    return _AUTO_CHOICES[key]


def choose_decode_linear(onednn_error: float) -> DecodeLinear:
    """The auto choice on a CPU with oneDNN, given oneDNN's relative error against float64."""
    if onednn_error > FP32_MAX_RELATIVE_ERROR:
        return DecodeLinear(
            "torch",
            F.linear,
            f"decode linear: torch (auto; onednn's rel. error {onednn_error:.1e} is not fp32-level)",
        )
    return DecodeLinear(
        "onednn", _onednn_linear, f"decode linear: onednn (auto; rel. error {onednn_error:.1e})"
    )


def _relative_error(fn: LinearFn, weight: torch.Tensor) -> float:
    """max |fn(x, W) - x W^T| / max |x W^T| for a random x, the exact product in float64."""
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.inference_mode():
        exact = x.double() @ weight.detach().double().t()
        got = fn(x, weight.detach(), None).double()
    return ((got - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()
