"""One pre-norm transformer layer: x + dropout(attn(norm(x))), then x + dropout(mlp(norm(x)))."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt.attention import SelfAttention
from megatron_lite.core.models.gpt.kv_cache import KVCache
from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.models.gpt.norms import build_norm
from megatron_lite.core.tensor_parallel import Dropout


class TransformerLayer(nn.Module):
    """Pre-norm residual layer; the residual stream stays [s, b, h] ([s/tp, b, h] under SP)."""

    def __init__(
        self, cfg: MegatronConfig, layer_number: int, tp_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = build_norm(cfg, tp_group)
        self.self_attention = SelfAttention(cfg, layer_number, tp_group)
        self.pre_mlp_layernorm = build_norm(cfg, tp_group)
        self.mlp = MLP(cfg, tp_group)
        # The residual stream is replicated over TP ranks (default generator, equal masks) unless it is
        # sequence-sharded, when each rank's shard needs its own mask (TP stream).
        self.hidden_dropout = Dropout(cfg.hidden_dropout, use_model_parallel_rng=cfg.sequence_parallel)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_cos: torch.Tensor | None = None,
        rotary_sin: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        rotary = None if rotary_cos is None else (rotary_cos, rotary_sin)
        attention = self.self_attention(self.input_layernorm(hidden), attention_mask, rotary, kv_cache)
        hidden = hidden + self.hidden_dropout(attention)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden))
        return hidden + self.hidden_dropout(mlp)
