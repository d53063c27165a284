"""One pre-norm transformer layer: x + dropout(attn(norm(x))), then x + dropout(mlp(norm(x)))."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt.attention import SelfAttention
from megatron_lite.core.models.gpt.kv_cache import KVCache
from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.models.gpt.multi_latent_attention import MLASelfAttention
from megatron_lite.core.models.gpt.norms import build_norm
from megatron_lite.core.models.gpt.recompute import CheckpointWithoutOutput
from megatron_lite.core.tensor_parallel import Dropout, checkpoint_with_rng_tracker
from megatron_lite.core.transformer.moe import is_moe_layer
from megatron_lite.core.transformer.moe.parallel import ExpertParallelState


class TransformerLayer(nn.Module):
    """Pre-norm residual layer; the residual stream stays [s, b, h] ([s/tp, b, h] under SP).

    Selective recompute (--recompute-modules, with --recompute-granularity selective): "layernorm"
    reruns both norms in backward without keeping their outputs, "mlp" checkpoints the whole MLP
    ("core_attn" is the attention's own).
    """

    def __init__(
        self,
        cfg: MegatronConfig,
        layer_number: int,
        tp_group: dist.ProcessGroup | None = None,
        ep: ExpertParallelState | None = None,
    ) -> None:
        """ep: the expert groups, for a layer that --moe-layer-freq makes an MoE layer (its `mlp`)."""
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = build_norm(cfg, tp_group)
        attention_class = MLASelfAttention if cfg.multi_latent_attention else SelfAttention
        self.self_attention = attention_class(cfg, layer_number, tp_group)
        self.pre_mlp_layernorm = build_norm(cfg, tp_group)
        if is_moe_layer(cfg, layer_number):
            # Imported here: the MoE package builds on this package's MLP and activations.
            from megatron_lite.core.transformer.moe.moe_layer import MoELayer

            self.mlp = MoELayer(cfg, layer_number, tp_group, ep)
        else:
            self.mlp = MLP(cfg, tp_group)
        # The residual stream is replicated over TP ranks (default generator, equal masks) unless it is
        # sequence-sharded, when each rank's shard needs its own mask (TP stream).
        self.hidden_dropout = Dropout(cfg.hidden_dropout, use_model_parallel_rng=cfg.sequence_parallel)
        selective = cfg.recompute_modules if cfg.recompute_granularity == "selective" else []
        self.recompute_layernorm = "layernorm" in selective
        self.recompute_mlp = "mlp" in selective

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_cos: torch.Tensor | None = None,
        rotary_sin: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        rotary = None if rotary_cos is None else (rotary_cos, rotary_sin)
        recompute = kv_cache is None and torch.is_grad_enabled()
        normed, norm_checkpoint = self._norm(self.input_layernorm, hidden, recompute)
        attention = self.self_attention(normed, attention_mask, rotary, kv_cache)
        if norm_checkpoint is not None:
            norm_checkpoint.discard_output_and_register_recompute(attention)
        hidden = hidden + self.hidden_dropout(attention)
        normed, norm_checkpoint = self._norm(self.pre_mlp_layernorm, hidden, recompute)
        if self.recompute_mlp and recompute:
            mlp = checkpoint_with_rng_tracker(self.mlp, normed)
        else:
            mlp = self.mlp(normed)
        if norm_checkpoint is not None:
            norm_checkpoint.discard_output_and_register_recompute(mlp)
        return hidden + self.hidden_dropout(mlp)

    def _norm(
        self, norm: nn.Module, hidden: torch.Tensor, recompute: bool
    ) -> tuple[torch.Tensor, CheckpointWithoutOutput | None]:
        """norm(hidden), and the checkpoint that will free it once its consumer ran (layernorm recompute)."""
        if not (self.recompute_layernorm and recompute):
            return norm(hidden), None
        checkpoint = CheckpointWithoutOutput(norm)
        return checkpoint(hidden), checkpoint
