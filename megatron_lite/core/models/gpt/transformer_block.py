"""The stack of transformer layers and the final norm, with full activation recompute."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt.kv_cache import KVCache
from megatron_lite.core.models.gpt.norms import build_norm
from megatron_lite.core.models.gpt.transformer_layer import TransformerLayer
from megatron_lite.core.tensor_parallel import checkpoint_with_rng_tracker
from megatron_lite.core.transformer.moe.parallel import ExpertParallelState


class TransformerBlock(nn.Module):
    """layers[0..L) then final_layernorm.

    --recompute-granularity full keeps only each checkpointed chunk's input for backward and reruns
    the chunk there: method "uniform" checkpoints consecutive chunks of recompute_num_layers layers,
    "block" checkpoints each of the first recompute_num_layers layers and runs the rest normally.
    (Selective recompute, --recompute-modules, lives in TransformerLayer and the attention.)
    """

    def __init__(
        self,
        cfg: MegatronConfig,
        tp_group: dist.ProcessGroup | None = None,
        *,
        layers: range | None = None,
        post_layer_norm: bool = True,
        ep: ExpertParallelState | None = None,
    ) -> None:
        """layers: the global numbers of the layers to keep (a pipeline stage's; default all). The others
        are built and dropped, so the kept ones draw the same initial weights as in the whole model."""
        super().__init__()
        keep = range(cfg.num_layers) if layers is None else layers
        built = (TransformerLayer(cfg, i, tp_group, ep) for i in range(cfg.num_layers))
        self.layers = nn.ModuleList(layer for layer in built if layer.layer_number in keep)
        final_layernorm = build_norm(cfg, tp_group)
        self.final_layernorm = final_layernorm if post_layer_norm else None
        self.recompute_full = cfg.recompute_granularity == "full"
        self.recompute_method = cfg.recompute_method
        self.recompute_num_layers = cfg.recompute_num_layers

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """hidden [s, b, h] ([s/tp, b, h] under sequence parallelism) -> normed, same shape."""
        cos, sin = rotary if rotary is not None else (None, None)
        if self.recompute_full and kv_cache is None and torch.is_grad_enabled():
            for start, end, recompute in self._chunks():
                if recompute:
                    hidden = checkpoint_with_rng_tracker(
                        self._run_layers(start, end), hidden, attention_mask, cos, sin
                    )
                else:
                    hidden = self._run_layers(start, end)(hidden, attention_mask, cos, sin)
        else:
            for layer in self.layers:
                hidden = layer(hidden, attention_mask, cos, sin, kv_cache)
        return self.final_layernorm(hidden) if self.final_layernorm is not None else hidden

    def _chunks(self) -> list[tuple[int, int, bool]]:
        """(start, end, recompute) ranges of layers covering the stack in order."""
        num_layers, n = len(self.layers), self.recompute_num_layers
        if self.recompute_method == "uniform":
            return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
        return [(i, i + 1, i < n) for i in range(num_layers)]

    def _run_layers(self, start: int, end: int) -> Callable[..., torch.Tensor]:
        """layers[start:end] as one function of tensors, the unit that checkpoint() recomputes."""

        def run(hidden, attention_mask, cos, sin):
            for layer in self.layers[start:end]:
                hidden = layer(hidden, attention_mask, cos, sin)
            return hidden

        return run
