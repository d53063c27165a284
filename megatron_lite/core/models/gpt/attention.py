"""Causal self-attention: fused QKV projection, q/k norms, RoPE, GQA, KV cache, sliding window, attention sinks,
core attention and output projection."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.config.model import is_layer_window_attention
from megatron_lite.core.context_parallel.attention import context_parallel_attention
from megatron_lite.core.models.gpt.attention_kernels import BLOCKED_MAX_SEQ, blocked_causal_attention
from megatron_lite.core.models.gpt.kv_cache import KVCache
from megatron_lite.core.models.gpt.norms import build_norm
from megatron_lite.core.models.gpt.rope import apply_rotary_pos_emb
from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    Dropout,
    RowParallelLinear,
    checkpoint_with_rng_tracker,
    init_method_normal,
    scaled_init_method_normal,
)
from megatron_lite.core.tensor_parallel.utils import init_sharded_weight, set_tensor_model_parallel_attributes


class DotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v for this rank's heads, with dropout on the probabilities.

    Without active dropout this is F.scaled_dot_product_attention, except for bf16 on a CPU under
    torch.compile (--compile --bf16): there causal (and sliding-window) self-attention runs
    attention_kernels' blocked kernel, whose element-wise ops inductor fuses; it skips the masked key
    blocks and measured about 1.9x SDPA's CPU flash kernel at seq 256 (benchmarks/bench_attention.py).
    Eager, in fp32 or at longer sequences, SDPA's kernel is the faster one. With dropout the
    probabilities are formed explicitly so the dropout runs through the tracker's model-parallel stream
    (each TP rank holds different heads and must draw different masks) and is replayed exactly by
    recompute.

    window_left (--window-size left,0): sliding-window attention, each query sees itself and the
    window_left positions before it; None attends to every earlier position.

    softmax_offset (--softmax-type off-by-one / learnable): one logit per head that joins every row's
    softmax denominator and attends to nothing (Megatron's SoftmaxOne, gpt-oss's attention sinks):
    p_j = exp(s_j) / (exp(offset) + sum_k exp(s_k)). SDPA cannot take it, so these runs form the
    probabilities explicitly (fp32 softmax over the scores and the extra column); vanilla runs are untouched.
    """

    def __init__(
        self,
        attention_dropout: float,
        num_heads: int,
        num_groups: int,
        head_dim: int,
        window_left: int | None = None,
        softmax_offset: torch.Tensor | None = None,
    ) -> None:
        """softmax_offset: this rank's [heads] sink logits; an nn.Parameter (learnable) becomes a parameter
        `softmax_offset` (Megatron's name, so its checkpoint key), a plain tensor (off-by-one's zeros) a
        buffer that is not saved."""
        super().__init__()
        self.num_heads = num_heads  # per TP rank
        self.num_groups = num_groups  # per TP rank
        self.head_dim = head_dim
        self.window_left = window_left
        self.scale = 1.0 / math.sqrt(head_dim)
        self.attention_dropout = Dropout(attention_dropout, use_model_parallel_rng=True)
        if isinstance(softmax_offset, nn.Parameter):
            self.softmax_offset = softmax_offset
        else:
            self.register_buffer("softmax_offset", softmax_offset, persistent=False)
        # (cp_group, comm_type) once core/context_parallel.apply_context_parallel has run: attention then
        # spans the sequence chunks of the whole CP group.
        self.context_parallel: tuple[dist.ProcessGroup, str] | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [sq, b, heads, d]; key/value [sk, b, groups, d]; mask [b, 1, sq, sk] True = masked.

        Queries are the last sq of sk positions (sk > sq with a KV cache). Returns [sq, b, heads*d].
        """
        sq, b = query.shape[:2]
        if self.context_parallel is not None:
            group, comm_type = self.context_parallel
            p = self.attention_dropout.p if self.training else 0.0
            out = context_parallel_attention(
                query.permute(1, 2, 0, 3),
                key.permute(1, 2, 0, 3),
                value.permute(1, 2, 0, 3),
                group,
                comm_type,
                self.window_left,
                dropout_p=p,
                dropout_seed=self.attention_dropout.draw_seed(query.device) if p > 0 else 0,
            )  # [b, heads, sq, d]
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
        sk = key.shape[0]
        dropout = self.training and self.attention_dropout.p > 0.0
        if sq == 1 and sk > 1 and attention_mask is None and not dropout:
            # a decoding step with a KV cache
            return attend_newest(query, key, value, self.window_left, self.softmax_offset)
        explicit = dropout or self.softmax_offset is not None
        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, groups, sk, d]
        v = value.permute(1, 2, 0, 3)
        keep = None  # [.., sq, sk] True = may attend
        if attention_mask is not None or sq != sk or self.window_left is not None:
            keys = torch.arange(sk, device=query.device)[None, :]
            queries = torch.arange(sk - sq, sk, device=query.device)[:, None]  # offset by the cache
            keep = keys <= queries  # causal
            if self.window_left is not None:
                keep = keep & (keys >= queries - self.window_left)
            if attention_mask is not None:
                keep = keep & ~attention_mask
        if explicit:
            out = self._explicit_attention(q, k, v, keep)
        elif self._blocked(query, sq, sk, attention_mask):
            out = blocked_causal_attention(q, k, v, self.scale, self.window_left)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=keep is None, enable_gqa=self.num_heads != self.num_groups
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)  # [sq, b, heads*d]

    @staticmethod
    def _blocked(query: torch.Tensor, sq: int, sk: int, attention_mask: torch.Tensor | None) -> bool:
        """The blocked kernel's case: bf16 self-attention of a whole sequence (no cache, no document mask)
        of at most BLOCKED_MAX_SEQ positions on a CPU while torch.compile traces it."""
        return (
            query.device.type == "cpu"
            and query.dtype == torch.bfloat16
            and sq == sk <= BLOCKED_MAX_SEQ
            and attention_mask is None
            and torch.compiler.is_compiling()
        )

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        repeat = self.num_heads // self.num_groups
        if repeat > 1:  # query heads of one group are adjacent: head i uses group i // repeat
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        # scores is a fresh [b, heads, sq, sk] tensor that the matmul's backward does not need, so the
        # scale and the mask are applied in place: two fewer tensors of the largest size in attention.
        scores = torch.matmul(q, k.transpose(-2, -1))  # [b, heads, sq, sk]
        scores.mul_(self.scale)
        if keep is None:
            sq = q.shape[2]
            keep = torch.ones(sq, sq, dtype=torch.bool, device=q.device).tril()
        scores.masked_fill_(~keep, float("-inf"))
        if self.softmax_offset is not None:
            probs = softmax_with_offset(scores, self.softmax_offset).to(q.dtype)
        else:
            # fp32 softmax (Megatron's softmax_in_fp32); dtype= widens inside the op, no separate copy.
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = self.attention_dropout(probs)
        return torch.matmul(probs, v)  # [b, heads, sq, d]

    def extra_repr(self) -> str:
        extras = [] if self.window_left is None else [f"window_left={self.window_left}"]
        if self.softmax_offset is not None:
            extras.append("softmax_offset")
        return ", ".join(extras)


def softmax_with_offset(scores: torch.Tensor, softmax_offset: torch.Tensor) -> torch.Tensor:
    """Megatron's SoftmaxOne in fp32: scores [b, heads, sq, sk] (masked entries -inf) and one logit per
    head [heads] -> probabilities [b, heads, sq, sk] whose rows sum to 1 - (the offset column's share)."""
    b, heads, sq, _ = scores.shape
    sink = softmax_offset.float().reshape(1, heads, 1, 1).expand(b, heads, sq, 1)
    return torch.softmax(torch.cat((scores.float(), sink), dim=-1), dim=-1)[..., :-1]


def attend_newest(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window_left: int | None = None,
    softmax_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the newest position alone: query [1, b, heads, d], key/value [sk, b, groups, d] ->
    [1, b, heads*d]. The one query may attend to every key (or, with a sliding window, to the last
    window_left + 1), so there is no mask to build (per layer and step at batch 1 that costs more than
    the attention itself); inference only (no dropout). softmax_offset [heads]: the attention sinks."""
    b, heads, d = query.shape[1:]
    if window_left is not None:
        key, value = key[-(window_left + 1) :], value[-(window_left + 1) :]
    if softmax_offset is not None:
        q = query.permute(1, 2, 0, 3)  # [b, heads, 1, d]
        k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, groups, sk, d]
        repeat = heads // key.shape[2]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))  # [b, heads, 1, sk]
        probs = softmax_with_offset(scores, softmax_offset).to(q.dtype)
        return torch.matmul(probs, v).reshape(1, b, heads * d)
    out = F.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3),  # [b, heads, 1, d]
        key.permute(1, 2, 0, 3),  # [b, groups, sk, d]
        value.permute(1, 2, 0, 3),
        enable_gqa=heads != key.shape[2],
    )  # [b, heads, 1, d]
    return out.reshape(1, b, heads * d)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with heads and groups split over TP.

    linear_qkv's output rows are laid out per query group as [q_1 .. q_{a/g}, k, v] (Megatron's
    interleaved layout), so a rank's contiguous row shard holds whole groups with their keys and values.
    """

    def __init__(
        self, cfg: MegatronConfig, layer_number: int, tp_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.head_dim = cfg.kv_channels
        self.heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.recompute_core_attention = (
            cfg.recompute_granularity == "selective" and "core_attn" in cfg.recompute_modules
        )
        self.rotary_interleaved = cfg.rotary_interleaved
        group_size = (self.heads_per_group + 2) * self.head_dim  # rows of one group: its q heads, k, v
        self.linear_qkv = ColumnParallelLinear(
            cfg.hidden_size,
            cfg.num_query_groups * group_size,
            init_method=init_method_normal(cfg.init_method_std),
            bias=cfg.qkv_bias,
            tp_group=tp_group,
            sequence_parallel=cfg.sequence_parallel,
        )
        # This rank's share of the groups (and so of the heads) is whatever its QKV shard holds.
        self.num_groups = self.linear_qkv.output_size_per_partition // group_size
        self.num_heads = self.num_groups * self.heads_per_group
        # --qk-layernorm: one norm over head_dim shared by all heads (replicated; each TP rank's gradient
        # covers only its heads, so build_norm sums it over TP).
        self.q_layernorm = self.k_layernorm = None
        if cfg.qk_layernorm:
            self.q_layernorm = build_norm(cfg, tp_group, self.head_dim, per_head=True)
            self.k_layernorm = build_norm(cfg, tp_group, self.head_dim, per_head=True)
        window = cfg.window_size if is_layer_window_attention(cfg, layer_number) else None
        self.core_attention = DotProductAttention(
            cfg.attention_dropout,
            self.num_heads,
            self.num_groups,
            self.head_dim,
            window_left=window[0] if window is not None and window[0] >= 0 else None,
            softmax_offset=self._softmax_offset(cfg, tp_group),
        )
        self.linear_proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim,
            cfg.hidden_size,
            init_method=scaled_init_method_normal(cfg.init_method_std, cfg.num_layers),
            bias=cfg.add_bias_linear,
            input_is_parallel=True,
            tp_group=tp_group,
            sequence_parallel=cfg.sequence_parallel,
        )

    def _softmax_offset(self, cfg: MegatronConfig, tp_group: dist.ProcessGroup | None) -> torch.Tensor | None:
        """This rank's [heads] sink logits of --softmax-type: None (vanilla), zeros (off-by-one), or a
        parameter drawn with the init method (learnable; Megatron's N(0, --init-method-std)), drawn whole
        and sharded by head over TP so that one seed gives the same model at any TP size."""
        if cfg.softmax_type == "vanilla":
            return None
        if cfg.softmax_type == "off-by-one":
            return torch.zeros(self.num_heads)
        tp_size, tp_rank = (1, 0)
        if tp_group is not None:
            tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        offset = init_sharded_weight(
            (cfg.num_attention_heads,), init_method_normal(cfg.init_method_std), 0, tp_rank, tp_size
        )
        offset = nn.Parameter(offset)
        set_tensor_model_parallel_attributes(offset, True, 0, 1)
        return offset

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """hidden [s, b, h] ([s/tp, b, h] under sequence parallelism) -> same shape."""
        qkv, _ = self.linear_qkv(hidden)  # [s, b, (heads + 2 groups) * d] for this rank
        query, key, value = self._split_qkv(qkv, rotary)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_number, key, value)  # [cached + s, b, groups, d]
        if self.recompute_core_attention and kv_cache is None and torch.is_grad_enabled():
            # Selective recompute: the attention core's [b, heads, s, s] tensors are not kept for backward.
            context = checkpoint_with_rng_tracker(self.core_attention, query, key, value, attention_mask)
        else:
            context = self.core_attention(query, key, value, attention_mask)  # [s, b, heads*d]
        out, _ = self.linear_proj(context)
        return out

    def decode_attention(
        self, qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, kv_cache: KVCache
    ) -> torch.Tensor:
        """The attention of one new token per sequence (no TP): fused qkv [1, b, (heads + 2 groups) * d],
        the output of linear_qkv -> context [1, b, heads*d], the input of linear_proj.

        forward() between its two projections, for GPTModel's decoding step (which runs the projections
        itself): the key and value join the cache, and the one query attends to every cached position.
        """
        query, key, value = self._split_qkv(qkv, rotary)
        key, value = kv_cache.update(self.layer_number, key, value)  # [cached + 1, b, groups, d]
        core = self.core_attention
        return attend_newest(query, key, value, core.window_left, core.softmax_offset)  # [1, b, heads*d]

    def _split_qkv(
        self, qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused [s, b, groups * (heads/group + 2) * d] -> query [s, b, heads, d], key and value
        [s, b, groups, d], with the q/k norms and then RoPE applied to query and key (Megatron's order)."""
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.num_groups, (self.heads_per_group + 2) * self.head_dim)
        query, key, value = qkv.split(
            [self.heads_per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1
        )
        query = query.reshape(s, b, self.num_heads, self.head_dim)
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        if rotary is not None:
            cos, sin = rotary
            query = apply_rotary_pos_emb(query, cos, sin, self.rotary_interleaved)
            key = apply_rotary_pos_emb(key, cos, sin, self.rotary_interleaved)
        return query, key, value
