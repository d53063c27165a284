"""Model architecture settings (network size, norms, positions, dropout, init)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name, require


@dataclass
class ModelArgs:
    """Model architecture settings (network size, norms, positions, dropout, init)."""

    num_layers: int | None = _f(None, "Number of transformer layers.", group="model")
    hidden_size: int | None = _f(None, "Transformer hidden size.", group="model")
    num_attention_heads: int | None = _f(None, "Number of attention heads.", group="model")
    ffn_hidden_size: int | None = _f(
        None, "MLP hidden size (default 4*hidden, or int(8h/3/64)*64 with --swiglu).", group="model"
    )
    kv_channels: int | None = _f(None, "Projection size per head (default hidden/heads).", group="model")
    group_query_attention: bool = _f(False, "Use grouped-query attention.", group="model")
    num_query_groups: int = _f(1, "Number of key/value groups with --group-query-attention.", group="model")
    seq_length: int | None = _f(None, "Sequence length of a training sample.", group="model")
    max_position_embeddings: int | None = _f(
        None, "Maximum sequence length the position embeddings cover.", group="model"
    )
    position_embedding_type: str = _f(
        "learned_absolute", "Position embedding.", choices=["learned_absolute", "rope", "none"], group="model"
    )
    use_rotary_position_embeddings: bool = _f(
        False, "Legacy spelling of --position-embedding-type rope.", group="model"
    )
    add_position_embedding: bool = _f(
        True, "--no-position-embedding (legacy) turns it off; only valid with rope.", group="model"
    )
    rotary_base: int = _f(10000, "RoPE base.", group="model")
    rotary_percent: float = _f(1.0, "Fraction of each head's dimensions that RoPE rotates.", group="model")
    rotary_interleaved: bool = _f(
        False, "RoPE rotates interleaved channel pairs (2i, 2i+1) instead of (i, i + d/2).", group="model"
    )
    rotary_seq_len_interpolation_factor: int | None = _f(
        None, "RoPE sees each position divided by this factor (linear position interpolation).", group="model"
    )
    use_rope_scaling: bool = _f(False, "Llama 3.x RoPE frequency scaling.", group="model")
    rope_scaling_factor: float = _f(8.0, "Factor of --use-rope-scaling.", group="model")
    window_size: str | tuple[int, int] | None = _f(
        None,
        "Sliding-window attention as Megatron's (left,right): each token sees itself and the `left` tokens "
        "before it (-1: all); right must be 0.",
        group="model",
    )
    normalization: str = _f(
        "LayerNorm", "Normalization layer.", choices=["LayerNorm", "RMSNorm"], group="model"
    )
    layernorm_epsilon: float = _f(1e-5, "Epsilon of the normalization layers.", group="model")
    layernorm_zero_centered_gamma: bool = _f(
        False, "--apply-layernorm-1p: norms store w (init 0) and scale by 1 + w.", group="model"
    )
    qk_layernorm: bool = _f(
        False,
        "Normalize each head's query and key (over head_dim) with the model's norm type.",
        group="model",
    )
    untie_embeddings_and_output_weights: bool = _f(
        False, "Give the output layer its own weights instead of the input embedding's.", group="model"
    )
    add_bias_linear: bool = _f(
        True, "Biases in all linear layers (--disable-bias-linear drops them).", group="model"
    )
    add_qkv_bias: bool = _f(
        False, "Keep the QKV bias even with --disable-bias-linear (Qwen-style).", group="model"
    )
    disable_qkv_bias: bool = _f(False, "Drop only the QKV projection's bias.", group="model")
    swiglu: bool = _f(False, "Use SwiGLU in the MLP instead of GELU.", group="model")
    squared_relu: bool = _f(False, "Use relu(x)^2 in the MLP instead of GELU.", group="model")
    openai_gelu: bool = _f(
        False, "GELU's tanh approximation (OpenAI's) instead of the exact erf GELU.", group="model"
    )
    attention_dropout: float = _f(0.1, "Dropout on attention probabilities.", group="model")
    hidden_dropout: float = _f(0.1, "Dropout on the embeddings and on each residual branch.", group="model")
    init_method_std: float = _f(
        0.02, "Std of the normal weight init (output projections: std/sqrt(2L)).", group="model"
    )
    make_vocab_size_divisible_by: int = _f(
        128, "Pad the vocabulary to a multiple of this times the TP size.", group="model"
    )
    vocab_size: int | None = _f(None, "Vocabulary size (default: the tokenizer's).", group="model")


def derive_model(cfg: Any) -> None:
    require(cfg, "num_layers", "hidden_size", "num_attention_heads")
    # Megatron's legacy position flags, mapped as its validate_args maps them.
    if cfg.use_rotary_position_embeddings:
        cfg.position_embedding_type = "rope"
    if not cfg.add_position_embedding and cfg.position_embedding_type != "rope":
        fail(
            "--no-position-embedding is deprecated and only accepted with rope: use --position-embedding-type "
            "none (no position information) or rope"
        )
    if cfg.seq_length is None and cfg.max_position_embeddings is not None:
        cfg.seq_length = cfg.max_position_embeddings
    if cfg.max_position_embeddings is None and cfg.seq_length is not None:
        cfg.max_position_embeddings = cfg.seq_length
    require(cfg, "seq_length")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(cfg, name) <= 0:
            fail(f"{flag_name(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.kv_channels is None:
        if cfg.hidden_size % cfg.num_attention_heads != 0:
            fail(
                f"--hidden-size {cfg.hidden_size} is not divisible by --num-attention-heads "
                f"{cfg.num_attention_heads}; pick sizes that divide or set --kv-channels"
            )
        cfg.kv_channels = cfg.hidden_size // cfg.num_attention_heads
    if cfg.ffn_hidden_size is None:
        if cfg.swiglu:
            cfg.ffn_hidden_size = int((4 * cfg.hidden_size * 2 / 3) / 64) * 64
        else:
            cfg.ffn_hidden_size = 4 * cfg.hidden_size
    if not cfg.group_query_attention:
        cfg.num_query_groups = cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_query_groups != 0:
        fail(
            f"--num-attention-heads {cfg.num_attention_heads} is not divisible by --num-query-groups "
            f"{cfg.num_query_groups}"
        )
    if cfg.seq_length > cfg.max_position_embeddings:
        fail(
            f"--seq-length {cfg.seq_length} is larger than --max-position-embeddings "
            f"{cfg.max_position_embeddings}; raise --max-position-embeddings or shorten --seq-length"
        )
    if cfg.position_embedding_type == "rope":
        rotary_dim = int(cfg.kv_channels * cfg.rotary_percent)
        if rotary_dim <= 0 or rotary_dim % 2 != 0:
            fail(
                f"--rotary-percent {cfg.rotary_percent} of head size {cfg.kv_channels} rotates {rotary_dim} "
                "dimensions; RoPE needs a positive even number"
            )
    for name in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            fail(f"{flag_name(name)} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.squared_relu and cfg.swiglu:
        fail("--squared-relu and --swiglu each pick the MLP's activation; give one of them")
    factor = cfg.rotary_seq_len_interpolation_factor
    if factor is not None and factor < 1:
        fail(
            f"--rotary-seq-len-interpolation-factor must be >= 1 (positions are divided by it), got {factor}"
        )
    if cfg.use_rope_scaling and cfg.rope_scaling_factor <= 0:
        fail(f"--rope-scaling-factor must be positive, got {cfg.rope_scaling_factor}")
    cfg.window_size = parse_window_size(cfg.window_size)


def parse_window_size(value: Any) -> tuple[int, int] | None:
    """--window-size as Megatron's tuple_type reads it ("128,0" or "(128,0)"; YAML may give a list), checked
    for a causal GPT: (left, 0) with left >= 0, or -1 for an unlimited window."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ",".join(map(str, value))
    try:
        numbers = tuple(int(part) for part in text.strip().strip("()[]").split(","))
    except ValueError:
        fail(f"--window-size {text}: expected two integers left,right such as 4096,0")
    if len(numbers) != 2:
        fail(f"--window-size {text}: expected two integers left,right such as 4096,0")
    left, right = numbers
    if right != 0:
        fail(f"--window-size {left},{right}: right must be 0, a GPT attends only to earlier tokens (causal)")
    if left < -1:
        fail(f"--window-size {left},{right}: left must be >= 0, or -1 for an unlimited window")
    return (left, right)
