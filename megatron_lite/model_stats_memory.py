"""Activation memory per rank for model_stats: Korthikanti et al.'s per-layer count, recompute, CP and SP."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config import MegatronConfig


def activation_bytes_per_layer(
    cfg: MegatronConfig, micro_batch_size: int, *, unfused_attention: bool
) -> float:
    """Bytes one transformer layer keeps for backward, per micro batch, on one rank (no recompute).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count,
    for 16-bit activations and 1-byte dropout masks, s·b·h·(34 + 5·a·s/h) per layer:
      - outside the TP region (divided by tp only with sequence parallelism), 10·sbh: the inputs of
        both norms and of QKV and fc1 (2 bytes each) and the two residual dropout masks (1 byte each);
      - inside it (divided by tp), 24·sbh: Q, K, V, the attention context, the GELU input (4h) and
        output (4h), 2 bytes each;
      - the attention core, 5·a·s²·b: softmax output (2), its dropout mask (1), dropout output (2).
    Generalised here: K and V have g·kv columns (GQA), the MLP has ffn columns (SwiGLU keeps
    gate+up, silu(gate) and the product: 4·ffn), activations are 4 bytes without --bf16/--fp16, and
    dropout masks exist only when the dropout is non-zero.
    The s x s term applies only when the attention probabilities are kept: our DotProductAttention
    uses SDPA (flash: only per-row softmax statistics, ignored here) unless attention dropout is
    active, and selective recompute drops the term as well. Small terms (RoPE's rotated q/k copies,
    RMSNorm's fp32 upcast) are ignored.
    """
    s, b, h = _local_seq(cfg), micro_batch_size, cfg.hidden_size
    tp = cfg.tensor_model_parallel_size
    a, g, kv, ffn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size
    elem = _element_bytes(cfg)
    hidden_mask = _mask_bytes(cfg.hidden_dropout)
    attn_mask = _mask_bytes(cfg.attention_dropout)

    outside = s * b * h * (4 * elem + 2 * hidden_mask) / _sequence_shards(cfg)
    mlp_columns = 4 * ffn if cfg.swiglu else 2 * ffn
    inside = s * b * elem * ((a + 2 * g) * kv + a * kv + mlp_columns) / tp
    scores = 0.0
    if attention_keeps_probabilities(cfg, unfused_attention):
        scores = a * s * s * b * (2 * elem + attn_mask) / tp
    return outside + inside + scores


def _local_seq(cfg: MegatronConfig) -> int:
    """Positions of each sequence one rank holds: all of them, or s / C under context parallelism."""
    return cfg.seq_length // cfg.context_parallel_size


def _element_bytes(cfg: MegatronConfig) -> int:
    """Bytes of one activation: 16-bit under --bf16/--fp16 autocast, else fp32."""
    return 2 if (cfg.bf16 or cfg.fp16) else 4


def _mask_bytes(dropout: float) -> int:
    """Bytes per element of a dropout mask: 1, or 0 when the dropout is off and keeps none."""
    return 1 if dropout > 0 else 0


def _sequence_shards(cfg: MegatronConfig) -> int:
    """How many ranks split the activations outside the TP region: tp with sequence parallelism, else 1."""
    return cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1


def attention_keeps_probabilities(cfg: MegatronConfig, unfused_attention: bool) -> bool:
    """Whether backward keeps the s x s attention probabilities (explicit softmax without recompute)."""
    if cfg.recompute_granularity is not None:
        return False  # selective recomputes the core; full recomputes everything
    if cfg.context_parallel_size > 1:
        return False  # the ring attention keeps q, k, v, its output and the softmax statistics only
    return unfused_attention or cfg.attention_dropout > 0


@dataclass(frozen=True)
class ActivationEstimate:
    per_layer: float  # bytes of one layer without recompute
    layers: float  # all layers, with the chosen recompute
    embedding_and_output: float
    total: float
    attention_probabilities_kept: bool


def estimate_activations(
    cfg: MegatronConfig, micro_batch_size: int, *, unfused_attention: bool = False
) -> ActivationEstimate:
    """Activation bytes per micro batch on one rank, with --recompute-* applied.

    Full recompute keeps each recompute chunk's input (s·b·h, /tp with SP) plus, while one chunk is
    recomputed in backward, that chunk's layers' activations. Embedding and output: the embedding
    dropout mask, the final norm's input and output, and the fp32 softmax of this rank's vocab shard
    that the vocab-parallel cross entropy keeps (4·s·b·V/tp).
    """
    s, b, h = _local_seq(cfg), micro_batch_size, cfg.hidden_size
    tp = cfg.tensor_model_parallel_size
    elem = _element_bytes(cfg)
    layer_bytes = activation_bytes_per_layer(cfg, b, unfused_attention=unfused_attention)
    layer_input = s * b * h * elem / _sequence_shards(cfg)
    n = cfg.num_layers
    if cfg.recompute_granularity == "full":
        k = cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":
            chunks = -(-n // k)
            layers = chunks * layer_input + min(k, n) * layer_bytes
        else:
            # block: the first k layers only keep their inputs; by the time backward recomputes
            # them the other layers' activations are freed, so the peak is the larger of the two.
            layers = k * layer_input + max(n - k, 1) * layer_bytes
    else:
        layers = n * layer_bytes
    edge = s * b * h * (_mask_bytes(cfg.hidden_dropout) + 2 * elem) / _sequence_shards(cfg)
    edge += 4 * s * b * cfg.padded_vocab_size / tp
    return ActivationEstimate(
        per_layer=layer_bytes,
        layers=layers,
        embedding_and_output=edge,
        total=layers + edge,
        attention_probabilities_kept=attention_keeps_probabilities(cfg, unfused_attention),
    )
