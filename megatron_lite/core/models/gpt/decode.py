"""The single-token KV-cache decoding step: GPTModel's forward written out over its weights, for speed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.core.models.gpt.attention import SelfAttention
from megatron_lite.core.models.gpt.kv_cache import KVCache, LinearFn
from megatron_lite.core.models.gpt.norms import LayerNorm
from megatron_lite.core.models.gpt.transformer_layer import TransformerLayer

if TYPE_CHECKING:  # gpt_model imports this module
    from megatron_lite.core.models.gpt.gpt_model import GPTModel


class DecodePlan:
    """GPTModel's forward for one new token per sequence with a KV cache, without TP, in eval mode.

    The general path's computation (embedding; each layer x + attn(norm(x)), then x + mlp(norm(x));
    final norm; output layer; dropout is off in eval) written out over the modules' weights, which are
    looked up once, when the plan is built for a KV cache. A step at batch 1 is ~25 matrix-vector
    products plus many tiny ops whose Python and dispatch overhead is a good part of the time: this
    skips the module calls, identity TP mappings and causal-mask logic of the general path, and runs the
    products with kv_cache.decode_linear. Norms other than plain LayerNorm are called as modules; hooks on
    the other modules do not run in these steps. The plan holds the parameters it looked up, so a
    model changed in place is seen, a replaced parameter only by a new cache. The logits equal the
    general path's up to fp32 rounding (the order of the bias add, the matrix-vector kernel).
    """

    def __init__(self, model: GPTModel) -> None:
        embedding = model.embedding
        self.word_embeddings = embedding.word_embeddings.weight  # [V_pad, h] (no TP: all rows)
        positions = embedding.position_embeddings
        self.position_embeddings = None if positions is None else positions.weight  # [max_pos, h]
        self.rotary_pos_emb = model.rotary_pos_emb
        self.layers = [DecodeLayer.of(layer) for layer in model.decoder.layers]
        self.final_layernorm = _norm_function(model.decoder.final_layernorm)
        self.output_weight = model.shared_embedding_or_output_weight()

    def step(
        self, tokens: torch.Tensor, position_ids: torch.Tensor | None, kv_cache: KVCache, linear: LinearFn
    ) -> torch.Tensor:
        """tokens [b, 1] -> logits [1, b, V_pad]; writes each layer's key and value into kv_cache."""
        b = tokens.shape[0]
        hidden = F.embedding(tokens.t(), self.word_embeddings)  # [1, b, h]
        if position_ids is None and self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings[kv_cache.length]  # the one position, broadcast
        elif self.position_embeddings is not None:
            hidden = hidden + F.embedding(position_ids.t(), self.position_embeddings)
        rotary = None
        if self.rotary_pos_emb is not None:
            if position_ids is None:
                position_ids = torch.full((b, 1), kv_cache.length, dtype=torch.long, device=tokens.device)
            rotary = self.rotary_pos_emb(position_ids)
        for layer in self.layers:
            qkv = linear(layer.input_layernorm(hidden), *layer.qkv)  # [1, b, (heads + 2 groups) * d]
            context = layer.attention.decode_attention(qkv, rotary, kv_cache)  # [1, b, heads*d]
            hidden = hidden + linear(context, *layer.proj)
            intermediate = linear(layer.pre_mlp_layernorm(hidden), *layer.fc1)  # [1, b, ffn] (x2 SwiGLU)
            hidden = hidden + linear(layer.activation_func(intermediate), *layer.fc2)
        return linear(self.final_layernorm(hidden), self.output_weight, None)  # [1, b, V_pad]


@dataclass(frozen=True)
class DecodeLayer:
    """A TransformerLayer as DecodePlan runs it: its norms, its attention (for decode_attention, which
    applies the q/k norms, RoPE and the sliding window), the (weight, bias) of its four products, and
    its MLP's activation."""

    input_layernorm: Callable[[torch.Tensor], torch.Tensor]
    attention: SelfAttention
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    proj: tuple[torch.Tensor, torch.Tensor | None]
    pre_mlp_layernorm: Callable[[torch.Tensor], torch.Tensor]
    fc1: tuple[torch.Tensor, torch.Tensor | None]
    fc2: tuple[torch.Tensor, torch.Tensor | None]
    activation_func: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: TransformerLayer) -> DecodeLayer:
        attention, mlp = layer.self_attention, layer.mlp
        return cls(
            input_layernorm=_norm_function(layer.input_layernorm),
            attention=attention,
            qkv=(attention.linear_qkv.weight, attention.linear_qkv.bias),
            proj=(attention.linear_proj.weight, attention.linear_proj.bias),
            pre_mlp_layernorm=_norm_function(layer.pre_mlp_layernorm),
            fc1=(mlp.linear_fc1.weight, mlp.linear_fc1.bias),
            fc2=(mlp.linear_fc2.weight, mlp.linear_fc2.bias),
            activation_func=mlp.activation_func,
        )


def _norm_function(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """LayerNorm as F.layer_norm on its weights (what its forward computes without sequence
    parallelism), saving the module call; any other norm (RMSNorm, a zero-centred LayerNorm, whose
    scale 1 + weight would go stale in a plan) is called as the module."""
    if type(norm) is LayerNorm and not norm.zero_centered_gamma:
        return functools.partial(
            F.layer_norm, normalized_shape=norm.weight.shape, weight=norm.weight, bias=norm.bias, eps=norm.eps
        )
    return norm
