"""Multi-latent attention (MLA, DeepSeek-V2/V3): low-rank query/key/value projections with a decoupled RoPE part."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt.kv_cache import KVCache
from megatron_lite.core.models.gpt.norms import build_norm
from megatron_lite.core.models.gpt.rope import RotaryEmbedding, YarnScaling, apply_rotary_pos_emb
from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    Dropout,
    RowParallelLinear,
    checkpoint_with_rng_tracker,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    init_method_normal,
    scaled_init_method_normal,
    set_tensor_model_parallel_attributes,
)
from megatron_lite.core.tensor_parallel.utils import InitMethod, init_sharded_weight

# MLATransformerConfig's YaRN settings that Megatron's command line has no flag for.
MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS = 4096
MLA_BETA_FAST = 32.0
MLA_BETA_SLOW = 1.0


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention factor 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1), Megatron's _yarn_get_mscale."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(cfg: MegatronConfig) -> float:
    """The score scale of MLA as Megatron computes it, for rope and yarn alike:
    mscale(--rotary-scaling-factor, --mscale-all-dim)^2 / sqrt(qk_head_dim + qk_pos_emb_head_dim)."""
    mscale = yarn_get_mscale(cfg.rotary_scaling_factor, cfg.mscale_all_dim)
    return mscale * mscale / math.sqrt(cfg.qk_head_dim + cfg.qk_pos_emb_head_dim)


def mla_rotary_embedding(cfg: MegatronConfig) -> RotaryEmbedding:
    """The RoPE of the qk_pos_emb_head_dim channels: YaRN (--rope-type yarn, MLA's default) with
    MLATransformerConfig's original max positions 4096 and beta 32/1, or plain RoPE (--rope-type rope)."""
    if cfg.rope_type == "rope":
        return RotaryEmbedding(cfg.qk_pos_emb_head_dim, cfg.rotary_percent, cfg.rotary_base)
    yarn = YarnScaling(
        cfg.rotary_scaling_factor,
        MLA_ORIGINAL_MAX_POSITION_EMBEDDINGS,
        MLA_BETA_FAST,
        MLA_BETA_SLOW,
        cfg.mscale,
        cfg.mscale_all_dim,
    )
    # Megatron's YarnRotaryEmbedding rotates every channel whatever --rotary-percent says.
    return RotaryEmbedding(cfg.qk_pos_emb_head_dim, 1.0, cfg.rotary_base, yarn=yarn)


def apply_mla_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA's RoPE (Megatron's apply_rotary_pos_emb with multi_latent_attention): the rotated channels are
    first de-interleaved ([x0, x2, ..., x1, x3, ...], DeepSeek's weight layout), then rotated half against
    half. x [s, b, heads, d]; cos/sin [s, b, 1, rot_dim] (mscale already in them)."""
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x_rot = torch.cat((x_rot[..., 0::2], x_rot[..., 1::2]), dim=-1)
    return apply_rotary_pos_emb(torch.cat((x_rot, x_pass), dim=-1), cos, sin)


class DuplicatedLinear(nn.Module):
    """y = x W^T with the whole W [out, in] on every TP rank (Megatron's TELinear parallel_mode="duplicated").

    MLA's down projections: their outputs (the latents) are small and every rank needs all of them. Under
    sequence parallelism each rank projects only its sequence shard, so its weight gradient is partial;
    passing the weight through copy_to_tp sums it over TP in backward (Megatron marks these weights
    `sequence_parallel` and sums them in finalize_model_grads). Without it the input is replicated and the
    gradient reaching the output is already complete on every rank (the up projections all-reduce it).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(init_sharded_weight((output_size, input_size), init_method, 0, 0, 1))
        set_tensor_model_parallel_attributes(self.weight, False)
        self.grad_sum_group = tp_group if sequence_parallel else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = copy_to_tensor_model_parallel_region(self.weight, self.grad_sum_group)
        return F.linear(x, weight), None

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, duplicated"


class MLADotProductAttention(nn.Module):
    """softmax(q k^T * softmax_scale + mask) v for this rank's heads, where the value head size differs from
    the query/key head size; dropout on the probabilities draws from the TP stream (as DotProductAttention)."""

    def __init__(
        self, attention_dropout: float, num_heads: int, v_head_dim: int, softmax_scale: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads  # per TP rank
        self.v_head_dim = v_head_dim
        self.softmax_scale = softmax_scale
        self.attention_dropout = Dropout(attention_dropout, use_model_parallel_rng=True)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [sq, b, heads, dk]; key [sk, b, heads, dk]; value [sk, b, heads, dv]; mask [b, 1, sq, sk]
        True = masked. Queries are the last sq of sk positions (a KV cache). Returns [sq, b, heads*dv]."""
        sq, b = query.shape[:2]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, dk]
        k = key.permute(1, 2, 0, 3)  # [b, heads, sk, dk]
        v = value.permute(1, 2, 0, 3)  # [b, heads, sk, dv]
        keep = None  # [.., sq, sk] True = may attend
        if attention_mask is not None or sq != sk:
            keys = torch.arange(sk, device=query.device)[None, :]
            queries = torch.arange(sk - sq, sk, device=query.device)[:, None]  # offset by the cache
            keep = keys <= queries
            if attention_mask is not None:
                keep = keep & ~attention_mask
        if self.training and self.attention_dropout.p > 0.0:
            scores = torch.matmul(q, k.transpose(-2, -1))  # [b, heads, sq, sk]
            scores.mul_(self.softmax_scale)
            if keep is None:
                keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            scores.masked_fill_(~keep, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(self.attention_dropout(probs), v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=keep is None, scale=self.softmax_scale
            )  # [b, heads, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.v_head_dim)


class MLASelfAttention(nn.Module):
    """Megatron's MLASelfAttention: heads split over TP, the down projections duplicated on every rank.

    query: linear_q_proj (--q-lora-rank unset), or linear_q_down_proj -> q_layernorm -> linear_q_up_proj,
    giving per head [qk_head_dim | qk_pos_emb_head_dim]. key/value: linear_kv_down_proj gives the latent
    [kv_lora_rank] and one RoPE key k_pos_emb [qk_pos_emb_head_dim] shared by all heads; the latent goes
    through kv_layernorm -> linear_kv_up_proj to per-head [k (qk_head_dim) | v (v_head_dim)]. The norms
    exist with --qk-layernorm (Megatron's local spec; identity otherwise). RoPE positions count from the
    KV cache's length, as Megatron's MLA (which ignores position ids). The KV cache holds the full
    per-head keys and values (exact; not the latents).
    """

    def __init__(
        self, cfg: MegatronConfig, layer_number: int, tp_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.tp_group = tp_group
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.sequence_parallel = cfg.sequence_parallel and tp_size > 1
        self.qk_head_dim, self.qk_pos_emb_head_dim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
        self.v_head_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.q_head_dim = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
        self.num_heads = cfg.num_attention_heads // tp_size  # per TP rank
        self.recompute_core_attention = (
            cfg.recompute_granularity == "selective" and "core_attn" in cfg.recompute_modules
        )
        init = init_method_normal(cfg.init_method_std)
        n = cfg.num_attention_heads

        def column(input_size: int, output_size: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(
                input_size,
                output_size,
                init_method=init,
                bias=False,
                tp_group=tp_group,
                sequence_parallel=cfg.sequence_parallel,
            )

        def duplicated(output_size: int) -> DuplicatedLinear:
            return DuplicatedLinear(
                cfg.hidden_size,
                output_size,
                init_method=init,
                tp_group=tp_group,
                sequence_parallel=self.sequence_parallel,
            )

        self.q_layernorm = self.kv_layernorm = None
        if cfg.q_lora_rank is None:
            self.linear_q_proj = column(cfg.hidden_size, n * self.q_head_dim)
        else:
            self.linear_q_down_proj = duplicated(cfg.q_lora_rank)
            self.linear_q_up_proj = column(cfg.q_lora_rank, n * self.q_head_dim)
            if cfg.qk_layernorm:
                self.q_layernorm = build_norm(cfg, tp_group, cfg.q_lora_rank)
        self.linear_kv_down_proj = duplicated(cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim)
        self.linear_kv_up_proj = column(cfg.kv_lora_rank, n * (cfg.qk_head_dim + cfg.v_head_dim))
        if cfg.qk_layernorm:
            self.kv_layernorm = build_norm(cfg, tp_group, cfg.kv_lora_rank)
        self.rotary_pos_emb = mla_rotary_embedding(cfg)
        self.core_attention = MLADotProductAttention(
            cfg.attention_dropout, self.num_heads, cfg.v_head_dim, mla_softmax_scale(cfg)
        )
        self.linear_proj = RowParallelLinear(
            n * cfg.v_head_dim,
            cfg.hidden_size,
            init_method=scaled_init_method_normal(cfg.init_method_std, cfg.num_layers),
            bias=cfg.add_bias_linear,
            input_is_parallel=True,
            tp_group=tp_group,
            sequence_parallel=cfg.sequence_parallel,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """hidden [s, b, h] ([s/tp, b, h] under sequence parallelism) -> same shape. `rotary` (the model's
        RoPE tables) is unused: MLA rotates its own qk_pos_emb_head_dim channels."""
        query, key, value = self.get_query_key_value_tensors(hidden, kv_cache)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_number, key, value)  # [cached + s, b, heads, d]
        if self.recompute_core_attention and kv_cache is None and torch.is_grad_enabled():
            context = checkpoint_with_rng_tracker(self.core_attention, query, key, value, attention_mask)
        else:
            context = self.core_attention(query, key, value, attention_mask)  # [s, b, heads*v_head_dim]
        out, _ = self.linear_proj(context)
        return out

    def get_query_key_value_tensors(
        self, hidden: torch.Tensor, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [s(/tp), b, h] -> query, key [s, b, heads, q_head_dim] and value [s, b, heads, v_head_dim]
        for this rank's heads, RoPE applied to the last qk_pos_emb_head_dim channels of query and key."""
        if hasattr(self, "linear_q_proj"):
            q, _ = self.linear_q_proj(hidden)  # [s, b, heads * q_head_dim]
        else:
            q_compressed, _ = self.linear_q_down_proj(hidden)  # [s(/tp), b, q_lora_rank]
            if self.q_layernorm is not None:
                q_compressed = self.q_layernorm(q_compressed)
            q, _ = self.linear_q_up_proj(q_compressed)  # [s, b, heads * q_head_dim]
        kv_combined, _ = self.linear_kv_down_proj(hidden)  # [s(/tp), b, kv_lora_rank + pos_dim]
        kv_compressed, k_pos_emb = kv_combined.split([self.kv_lora_rank, self.qk_pos_emb_head_dim], dim=-1)
        # k_pos_emb feeds this rank's heads only, so its gradient is partial: gathering the sequence
        # reduce-scatters it back (SP), copy_to_tp all-reduces it (TP without SP; Megatron's unfused
        # path leaves this gradient partial there).
        if self.sequence_parallel:
            k_pos_emb = gather_from_sequence_parallel_region(k_pos_emb, self.tp_group)  # [s, b, pos_dim]
        else:
            k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb, self.tp_group)
        if self.kv_layernorm is not None:
            kv_compressed = self.kv_layernorm(kv_compressed)
        kv, _ = self.linear_kv_up_proj(kv_compressed)  # [s, b, heads * (qk_head_dim + v_head_dim)]
        s, b = q.shape[:2]
        q = q.view(s, b, self.num_heads, self.q_head_dim)
        kv = kv.view(s, b, self.num_heads, self.qk_head_dim + self.v_head_dim)
        q_no_pe, q_pos_emb = q.split([self.qk_head_dim, self.qk_pos_emb_head_dim], dim=-1)
        k_no_pe, value = kv.split([self.qk_head_dim, self.v_head_dim], dim=-1)
        offset = kv_cache.length if kv_cache is not None else 0
        positions = torch.arange(offset, offset + s, device=q.device).unsqueeze(0).expand(b, s)
        cos, sin = self.rotary_pos_emb(positions)  # [s, b, 1, pos_dim]
        q_pos_emb = apply_mla_rotary_pos_emb(q_pos_emb, cos, sin)  # [s, b, heads, pos_dim]
        k_pos_emb = apply_mla_rotary_pos_emb(k_pos_emb.unsqueeze(2), cos, sin)  # [s, b, 1, pos_dim]
        query = torch.cat((q_no_pe, q_pos_emb), dim=-1)  # [s, b, heads, q_head_dim]
        key = torch.cat((k_no_pe, k_pos_emb.expand(-1, -1, self.num_heads, -1)), dim=-1)
        return query, key, value.contiguous()
