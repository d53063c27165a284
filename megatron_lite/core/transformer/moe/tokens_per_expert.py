"""--save-tokens-per-expert-interval: each MoE layer's tokens per local expert written as Megatron's
activation_logging writes them ({save}/tokens_per_expert/rank{R}.jsonl), and the global batch's expert
load as TensorBoard scalars."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config.moe_checks import parse_moe_layer_freq
from megatron_lite.core.transformer.moe import aux_losses

# Megatron hooks decoder.layers.<N>.mlp.experts.linear_fc1 and names the layer by that N: the index in
# the model chunk's module list (local to a pipeline stage).
_LAYER_NAME = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.mlp$")
# What Megatron has no TensorBoard value for and a user balancing experts wants: how far the busiest and
# the idlest expert are from an even share, in the global batch of the step (1.0 = perfectly balanced).
MAX_TAG, MIN_TAG = "moe/tokens_per_expert_max_over_mean", "moe/tokens_per_expert_min_over_mean"


class TokensPerExpertLogger:
    """On iterations that are multiples of --save-tokens-per-expert-interval: forward hooks on the MoE
    layers record, per micro batch, the tokens each of this rank's experts received (after dispatch,
    so from every rank of its expert group: Megatron's tokens_per_expert), and on the routers the top-k
    choices of this rank's own tokens over all experts, which summed over the ranks give the global batch.

    The JSON lines are Megatron's: {"iter": N, "block": "decoder", "layer": L, "tpe": [[...], ...]}, one
    per MoE layer and saving iteration, one list of local-expert counts per micro batch.
    """

    def __init__(self, cfg: Any, module: nn.Module) -> None:
        from megatron_lite.core.transformer.moe.moe_layer import MoELayer

        self.interval = cfg.save_tokens_per_expert_interval
        self.directory = Path(cfg.save) / "tokens_per_expert"
        self.per_layer_logging = cfg.moe_per_layer_logging
        self.layers: list[tuple[int, MoELayer]] = []
        for name, sub in module.named_modules():
            match = _LAYER_NAME.search(name)
            if isinstance(sub, MoELayer) and match:
                self.layers.append((int(match.group(1)), sub))
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._records: dict[int, list[list[int]]] = {}
        self._routed = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.float64)
        self.pattern = parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)
        self._iteration: int | None = None

    @classmethod
    def build(cls, cfg: Any, module: nn.Module) -> TokensPerExpertLogger | None:
        return cls(cfg, module) if getattr(cfg, "save_tokens_per_expert_interval", None) else None

    def start(self, iteration: int) -> None:
        """Before iteration `iteration` (1-based)'s forward passes: hook the layers when it is a saving one
        (every rank, also one whose pipeline stage has no MoE layer: finish() is collective)."""
        if iteration % self.interval != 0:
            return
        self._iteration = iteration
        self._records = {local: [] for local, _ in self.layers}
        self._routed.zero_()
        for local, layer in self.layers:
            self._hooks.append(layer.register_forward_hook(self._layer_hook(local)))
            self._hooks.append(layer.router.register_forward_hook(self._router_hook(layer.layer_number)))

    def _layer_hook(self, local: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not aux_losses.in_recompute():  # a recomputed forward is the same micro batch again
                self._records[local].append([int(c) for c in module.tokens_per_expert.tolist()])

        return hook

    def _router_hook(self, layer_number: int):
        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if not aux_losses.in_recompute():
                routing_map = output[1]
                self._routed[layer_number] += routing_map.sum(dim=0).detach().to("cpu", torch.float64)

        return hook

    def finish(self, writers: Any = None) -> dict[int, torch.Tensor] | None:
        """After a saving iteration's step: unhook, append this rank's JSON lines, and (collective over
        the world) sum the routers' counts into the global batch's tokens per expert of every MoE layer;
        writes the load scalars when `writers` is given. Returns {global layer: counts [E]}, or None on
        other iterations."""
        if self._iteration is None:
            return None
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._write_jsonl()
        counts = self._routed.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Each layer lives on one pipeline stage; every rank of that stage routed different tokens
            # (DP, CP and, with sequence parallelism, TP ranks), so the world's sum is the global batch.
            dist.all_reduce(counts)
        global_counts = {i: counts[i] for i, moe in enumerate(self.pattern) if moe}
        if writers is not None:
            self._write_scalars(writers, global_counts)
        self._iteration = None
        return global_counts

    def _write_jsonl(self) -> None:
        if not self._records:
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"iter": self._iteration, "block": "decoder", "layer": local, "tpe": micro_batches})
            + "\n"
            for local, micro_batches in sorted(self._records.items())
        ]
        with open(self.directory / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
            f.writelines(lines)
        self._records = {}

    def _write_scalars(self, writers: Any, global_counts: dict[int, torch.Tensor]) -> None:
        ratios = {i: load_over_mean(c) for i, c in global_counts.items()}
        if not ratios:
            return
        writers.scalar(MAX_TAG, max(r[0] for r in ratios.values()), self._iteration)
        writers.scalar(MIN_TAG, min(r[1] for r in ratios.values()), self._iteration)
        if self.per_layer_logging:
            for i, (high, low) in ratios.items():
                writers.scalar(f"{MAX_TAG}_layer_{i}", high, self._iteration)
                writers.scalar(f"{MIN_TAG}_layer_{i}", low, self._iteration)


def load_over_mean(counts: torch.Tensor) -> tuple[float, float]:
    """(max, min) tokens of one expert over the mean tokens per expert."""
    mean = counts.sum() / counts.numel()
    return float(counts.max() / mean), float(counts.min() / mean)
