"""Checkpoint-test helpers: a small model of real TP layers, TP-independent optimizer steps, full views."""

from __future__ import annotations

import random

import numpy as np
import torch
from helpers import tiny_config
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_rng_tracker,
    init_method_normal,
    merge_shards,
    model_parallel_manual_seed,
    split_for_rank,
)
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.optimizer import build_optimizer

VOCAB = 257  # ByteTokenizer's vocabulary: padded to 384 at TP=1, 512 at TP=2 and TP=4


def make_cfg(tp: int = 1, world_size: int | None = None, **overrides) -> MegatronConfig:
    """The checkpoint tests' model: 1 layer, h=8, s=8, 10 iterations of lr 1e-2 with weight decay."""
    shape = dict(num_layers=1, hidden_size=8, seq_length=8, micro_batch_size=1, tensor_model_parallel_size=tp)
    schedule = dict(train_iters=10, lr=1e-2, lr_warmup_iters=2, weight_decay=0.1)
    return tiny_config(world_size or tp, VOCAB, **{**shape, **schedule, **overrides})


class TinyTPModel(nn.Module):
    """Every kind of tensor a GPT checkpoint holds: a vocab-padded embedding and untied output layer,
    a column-parallel weight with partition stride 2 (SwiGLU's fc1), a row-parallel weight, replicated
    norm and bias, and a persistent buffer. The same seed gives the same full weights at any TP."""

    def __init__(self, cfg: MegatronConfig, pstate: ParallelState | None = None) -> None:
        super().__init__()
        pstate = pstate or ParallelState()
        group = pstate.tp_group
        h, ffn, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
        init = init_method_normal(0.02)
        torch.manual_seed(cfg.seed)
        self.embedding = nn.Module()
        self.embedding.word_embeddings = VocabParallelEmbedding(
            v, h, init_method=init, tp_group=group, unpadded_num_embeddings=cfg.vocab_size
        )
        self.fc1 = ColumnParallelLinear(h, 2 * ffn, init_method=init, tp_group=group, stride=2)
        self.fc2 = RowParallelLinear(ffn, h, init_method=init, tp_group=group)
        self.norm = nn.LayerNorm(h)
        self.norm.weight.tensor_model_parallel = False
        self.norm.bias.tensor_model_parallel = False
        self.output_layer = ColumnParallelLinear(
            h, v, init_method=init, tp_group=group, bias=False, unpadded_output_size=cfg.vocab_size
        )
        self.register_buffer("seen_tokens", torch.tensor([3.0, 5.0]))


def is_vocab(name: str) -> bool:
    return name.startswith(("embedding.word_embeddings", "output_layer"))


def to_local(
    name: str, full: torch.Tensor, info: tuple[bool, int, int], tp_rank: int, tp_size: int, padded: int
):
    """A TP rank's shard of a full tensor (true vocab rows zero-padded to `padded`); info from param_info."""
    sharded, dim, stride = info
    if is_vocab(name):
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    if not sharded:
        return full.clone()
    return split_for_rank(full, dim, tp_rank, tp_size, stride)


def to_full(name: str, shards: list[torch.Tensor], info: tuple[bool, int, int]) -> torch.Tensor:
    """The full tensor from every TP rank's shard (in TP-rank order), vocab rows cut to the true vocab."""
    sharded, dim, stride = info
    full = merge_shards(shards, dim, stride) if sharded else shards[0]
    return full[:VOCAB] if is_vocab(name) else full


def param_info(model: nn.Module) -> dict[str, tuple[bool, int, int]]:
    """(TP-sharded, partition dim, partition stride) of every parameter."""
    return {
        name: (
            bool(getattr(p, "tensor_model_parallel", False)),
            getattr(p, "partition_dim", -1),
            getattr(p, "partition_stride", 1),
        )
        for name, p in model.named_parameters()
    }


def full_gradient(name: str, logical_shape: tuple[int, ...], step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    return torch.randn(logical_shape, generator=generator)


def train_steps(
    model: nn.Module, optimizer, scheduler, cfg: MegatronConfig, pstate: ParallelState, steps: range
) -> None:
    """Optimizer steps with the same full gradients at any TP size (padded vocab rows get zero)."""
    info = param_info(model)
    for step in steps:
        for name, param in model.named_parameters():
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= pstate.tp_size
            if is_vocab(name):
                shape[0] = VOCAB
            full = full_gradient(name, tuple(shape), step)
            param.grad = to_local(
                name, full, info[name], pstate.tp_rank, pstate.tp_size, cfg.padded_vocab_size
            )
        optimizer.step()
        scheduler.step(cfg.global_batch_size)


def build(cfg: MegatronConfig, pstate: ParallelState | None = None, seed: int | None = None):
    """Model, optimizer (ZeRO when cfg asks and DP > 1) and scheduler."""
    pstate = pstate or ParallelState()
    if seed is not None:
        cfg.seed = seed
    model = TinyTPModel(cfg, pstate)
    optimizer = build_optimizer(model, cfg, pstate)
    scheduler = OptimizerParamScheduler.from_config(optimizer, cfg)
    return model, optimizer, scheduler


def local_optimizer(optimizer):
    return getattr(optimizer, "optim", optimizer)


def snapshot(model: nn.Module, optimizer) -> dict:
    """This rank's parameters and the Adam states it owns, by parameter name (clones)."""
    names = {id(p): n for n, p in model.named_parameters()}
    local = local_optimizer(optimizer)
    states = {
        names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in local.state[p].items()}
        for group in local.param_groups
        for p in group["params"]
        if p in local.state and local.state[p]
    }
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffer = model.seen_tokens.clone() if hasattr(model, "seen_tokens") else torch.zeros(0)
    return {"params": params, "states": states, "buffer": buffer}


def seed_everything(seed: int, tp_rank: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed, tp_rank)


def draw_random_numbers() -> dict:
    """One draw from every generator a checkpoint restores (advances them)."""
    with get_rng_tracker().fork():
        tracked = torch.rand(3)
    return {
        "random": random.random(),
        "np": float(np.random.rand()),
        "torch": torch.rand(3),
        "tracker": tracked,
    }
