"""Model architecture settings (network size, norms, positions, dropout, init)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name, require
from megatron_lite.config.mla_checks import derive_mla
from megatron_lite.config.moe_checks import derive_moe, parse_list_expression


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
    quick_geglu: bool = _f(
        False,
        "gpt-oss's gated MLP: quick_gelu(gate) * (up + offset), quick_gelu(x) = x sigmoid(1.702 x).",
        group="model",
    )
    glu_linear_offset: float = _f(
        0.0, "Offset added to a gated MLP's linear half: act(gate) * (up + offset).", group="model"
    )
    activation_func_clamp_value: float | None = _f(
        None, "Clamp a gated MLP's inputs: gate to <= V, up to [-V, V] (gpt-oss: 7.0).", group="model"
    )
    softmax_type: str = _f(
        "vanilla",
        "Attention softmax: vanilla, off-by-one (a zero logit in every denominator) or learnable (a learned "
        "logit per head, gpt-oss's attention sinks).",
        choices=["vanilla", "off-by-one", "learnable"],
        group="model",
    )
    window_attn_skip_freq: str | int | list[int] | None = _f(
        None,
        "Which layers use --window-size: N (every N-th layer is full attention) or a pattern such as "
        "[1,1,1,0]*3 (1 = sliding window), parsed without eval.",
        group="model",
    )
    enable_gpt_oss: bool = _f(
        False,
        "gpt-oss's RoPE: YaRN with factor 32, original max positions 131072, beta fast 32 / slow 1, "
        "unrounded correction range (the constants of Megatron's ModelOpt builder, the only place Megatron "
        "reads this flag; here it applies to every run).",
        group="model",
    )
    # ---- multi-latent attention (DeepSeek-V2/V3); Megatron's dests and defaults ----------------------
    multi_latent_attention: bool = _f(
        False,
        "Multi-latent attention (low-rank q/kv projections, decoupled RoPE) instead of MHA/GQA.",
        group="mla",
    )
    q_lora_rank: int | None = _f(
        None, "Rank of the query's low-rank projection (None: one full linear_q_proj).", group="mla"
    )
    kv_lora_rank: int = _f(32, "Rank of the key/value latent.", group="mla")
    qk_head_dim: int = _f(128, "Per-head query/key size without the RoPE part.", group="mla")
    qk_pos_emb_head_dim: int = _f(64, "Per-head size of the RoPE part of query/key.", group="mla")
    v_head_dim: int = _f(128, "Per-head value size.", group="mla")
    rope_type: str | None = _f(
        None,
        "MLA's RoPE: yarn (the default with MLA) or rope; other attention takes rope only.",
        choices=["rope", "yarn"],
        group="mla",
    )
    rotary_scaling_factor: float = _f(1.0, "YaRN scaling factor of MLA's RoPE.", group="mla")
    mscale: float = _f(1.0, "YaRN mscale of MLA's RoPE.", group="mla")
    mscale_all_dim: float = _f(
        0.0, "YaRN mscale_all_dim of MLA's RoPE (also in the softmax scale).", group="mla"
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
    # ---- mixture of experts (issue 14); Megatron's dests and defaults --------------------------------
    num_experts: int | None = _f(
        None, "Number of routed experts of each MoE layer (None: no MoE).", group="moe"
    )
    moe_ffn_hidden_size: int | None = _f(
        None, "Each routed expert's ffn hidden size (default: --ffn-hidden-size).", group="moe"
    )
    moe_layer_freq: str | int | list[int] = _f(
        1,
        "MoE layers among the layers: N (every N-th layer, from the first) or a pattern such as "
        "([0]*1+[1]*3) (1 = MoE), parsed without eval.",
        group="moe",
    )
    moe_router_topk: int = _f(2, "Experts each token is routed to.", group="moe")
    moe_router_score_function: str = _f(
        "softmax", "Router score function.", choices=["softmax", "sigmoid"], group="moe"
    )
    moe_router_pre_softmax: bool = _f(False, "Softmax over all experts before the top-k.", group="moe")
    moe_router_topk_scaling_factor: float | None = _f(
        None, "Factor on the top-k routing probabilities.", group="moe"
    )
    moe_router_num_groups: int | None = _f(None, "Expert groups of group-limited routing.", group="moe")
    moe_router_group_topk: int | None = _f(
        None, "Groups each token may use (group-limited routing).", group="moe"
    )
    moe_router_dtype: str | None = _f(
        None,
        "Router logits and combine in fp32/fp64 (default: the input dtype).",
        choices=["fp32", "fp64"],
        group="moe",
    )
    moe_router_load_balancing_type: str | list[str] = _f(
        "aux_loss",
        "Load-balancing loss(es) of the router.",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
        nargs="+",
        group="moe",
    )
    moe_aux_loss_coeff: float | list[float] = _f(
        0.0, "Coefficient(s) of the load-balancing loss(es).", nargs="+", group="moe"
    )
    moe_z_loss_coeff: float | None = _f(None, "Coefficient of the router z-loss.", group="moe")
    moe_router_enable_expert_bias: bool = _f(
        False, "Aux-loss-free balancing: a per-expert routing bias updated each step (sigmoid).", group="moe"
    )
    moe_router_bias_update_rate: float = _f(1e-3, "Step of the expert-bias update.", group="moe")
    moe_expert_capacity_factor: float | None = _f(
        None, "Expert capacity factor; tokens beyond capacity are dropped (None: dropless).", group="moe"
    )
    moe_pad_expert_input_to_capacity: bool = _f(
        False, "Pad every expert's input to its capacity (needs a capacity factor).", group="moe"
    )
    moe_token_drop_policy: str = _f(
        "probs", "Which tokens beyond capacity are dropped.", choices=["probs", "position"], group="moe"
    )
    moe_shared_expert_intermediate_size: int | None = _f(
        None, "Total ffn size of the shared experts (None: no shared expert).", group="moe"
    )
    moe_shared_expert_gate: bool = _f(
        False, "A sigmoid gate on the shared experts' output (Qwen2-MoE style).", group="moe"
    )
    moe_grouped_gemm: bool = _f(
        False, "Run the local experts as one grouped GEMM (torch._grouped_mm) instead of a loop.", group="moe"
    )
    moe_token_dispatcher_type: str = _f(
        "allgather", "How tokens reach their experts' ranks.", choices=["allgather", "alltoall"], group="moe"
    )
    moe_per_layer_logging: bool = _f(False, "Log the MoE losses of every layer too.", group="moe")
    expert_model_parallel_size: int = _f(1, "Expert-parallel size (experts split over ranks).", group="moe")
    expert_tensor_parallel_size: int | None = _f(
        None, "Tensor-parallel size inside each expert (default: --tensor-model-parallel-size).", group="moe"
    )

    @property
    def gated_linear_unit(self) -> bool:
        """Whether the MLP is gated (fc1 outputs [gate; up]): --swiglu or --quick-geglu, as Megatron's
        TransformerConfig.gated_linear_unit."""
        return bool(self.swiglu or self.quick_geglu)


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
    if cfg.position_embedding_type == "rope" and not cfg.multi_latent_attention:
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
    derive_gpt_oss_switches(cfg)
    derive_mla(cfg)
    derive_moe(cfg)


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


def derive_gpt_oss_switches(cfg: Any) -> None:
    """gpt-oss's architecture switches, checked as Megatron's validate_args and TransformerConfig check them."""
    if cfg.quick_geglu and (cfg.swiglu or cfg.squared_relu):
        fail("--quick-geglu picks the MLP's activation; give it without --swiglu or --squared-relu")
    clamp = cfg.activation_func_clamp_value
    if clamp is not None and cfg.swiglu:
        # TransformerConfig's rules for a clamped SwiGLU (config/ranges.py already made it finite and positive).
        if not cfg.num_experts:
            fail("--activation-func-clamp-value with --swiglu needs MoE (--num-experts), as in Megatron")
        if cfg.glu_linear_offset != 0.0:
            fail("--glu-linear-offset must be 0 with --swiglu and --activation-func-clamp-value (Megatron)")
    if cfg.window_attn_skip_freq is not None:
        if cfg.window_size is None:
            fail("--window-attn-skip-freq picks which layers use --window-size; give --window-size too")
        cfg.window_attn_skip_freq = parse_window_attn_skip_freq(cfg.window_attn_skip_freq, cfg.num_layers)
    if cfg.enable_gpt_oss:
        if cfg.position_embedding_type != "rope":
            fail(
                "--enable-gpt-oss switches RoPE to gpt-oss's YaRN: it needs --position-embedding-type rope, "
                f"got {cfg.position_embedding_type}"
            )
        if cfg.rotary_interleaved:
            fail("--enable-gpt-oss: YaRN RoPE does not support --rotary-interleaved (as Megatron)")
        if cfg.rotary_percent != 1.0:
            fail("--enable-gpt-oss: YaRN RoPE rotates every channel; --rotary-percent must be 1.0")
        if cfg.use_rope_scaling or cfg.rotary_seq_len_interpolation_factor is not None:
            fail(
                "--enable-gpt-oss: YaRN RoPE takes the place of --use-rope-scaling and "
                "--rotary-seq-len-interpolation-factor; drop them"
            )


def parse_window_attn_skip_freq(value: Any, num_layers: int) -> int | list[int]:
    """--window-attn-skip-freq as Megatron's moe_freq_type reads it: an int N (layer numbers 1, 2, ... that
    are multiples of N are full attention), or a list expression such as "[1,1,1,0]*3" with one 0/1 per
    layer (1 = sliding window), parsed without eval."""
    flag = "--window-attn-skip-freq"
    if isinstance(value, list):
        pattern = [int(v) for v in value]
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        freq = int(value)
        if freq < 1:
            fail(f"{flag} {value}: an integer frequency must be >= 1")
        return freq
    else:
        pattern = parse_list_expression(str(value), flag)
    if any(v not in (0, 1) for v in pattern):
        fail(f"{flag} {value}: the pattern may only hold 1 (sliding window) and 0 (full attention)")
    if len(pattern) != num_layers:
        fail(f"{flag} {value}: the pattern has {len(pattern)} entries but --num-layers is {num_layers}")
    return pattern


def is_layer_window_attention(cfg: Any, layer_number: int) -> bool:
    """Whether layer `layer_number` (0-based, as our layers count) uses --window-size: Megatron's
    is_layer_window_attention, which counts layers from 1."""
    if not cfg.window_size:
        return False
    freq = cfg.window_attn_skip_freq
    if freq is None:
        return True
    if isinstance(freq, int):
        return (layer_number + 1) % freq != 0
    return bool(freq[layer_number])
