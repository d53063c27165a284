"""Shared by the GPT tests: small configs, an independent reference forward, gathering TP shards."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from helpers import tiny_config

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import merge_shards

LLAMA_STYLE = dict(
    normalization="RMSNorm",
    position_embedding_type="rope",
    swiglu=True,
    group_query_attention=True,
    num_query_groups=2,
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
)

# Models using several of Megatron's architecture switches at once, for the decoding and TP tests.
SWITCH_STYLES = {
    "llama-switches": dict(
        LLAMA_STYLE,
        qk_layernorm=True,
        layernorm_zero_centered_gamma=True,
        rotary_interleaved=True,
        use_rope_scaling=True,
        rope_scaling_factor=4.0,
        rotary_base=1000000,
        window_size="5,0",
    ),
    "gpt2-switches": dict(
        squared_relu=True, qk_layernorm=True, layernorm_zero_centered_gamma=True, window_size="4,0"
    ),
}


# What the GPT tests add to the shared tiny model: the exact vocabulary (no padding), no dropout, a fixed seed.
GPT_TEST_SETTINGS = dict(make_vocab_size_divisible_by=1, hidden_dropout=0.0, attention_dropout=0.0, seed=1234)


def make_config(world_size: int = 1, vocab_size: int = 257, **overrides) -> MegatronConfig:
    """A tiny finalized config (2 layers, h=32, 4 heads, s=16, no dropout) with overrides."""
    return tiny_config(world_size, vocab_size, **{**GPT_TEST_SETTINGS, **overrides})


def batch(cfg: MegatronConfig, seed: int = 0, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and next-token labels [b, s] over the true vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_length + 1), generator=gen)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()


def full_state(model: torch.nn.Module, group: dist.ProcessGroup | None, grads: bool = False) -> dict:
    """Every parameter (or its gradient) as the full unsharded tensor, gathered over the TP group."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.data
        if tensor is None:
            continue
        if param.tensor_model_parallel and group is not None:
            shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = merge_shards(shards, param.partition_dim, param.partition_stride)
        out[name] = tensor.detach().clone()
    return out


def train_and_gather(model: torch.nn.Module, cfg: MegatronConfig, group: dist.ProcessGroup | None) -> dict:
    """One backward of the summed loss, then full weights, gradients, the loss and full-vocab logits."""
    from megatron_lite.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, labels = batch(cfg)
    loss = model(tokens, labels=labels)
    loss.mean().backward()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens), group)
    return {
        "weights": full_state(model, group),
        "grads": full_state(model, group, grads=True),
        "loss": loss.detach(),
        "logits": logits,
    }


def saved_bytes_for_backward(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """The mean loss of one forward, and the bytes of distinct non-parameter storages it keeps for backward.

    Every tensor an autograd node saves (checkpoint's kept inputs included) passes the pack hook;
    counting each storage once, at its size after the forward (output-discarding recompute frees some
    in place), gives exactly the activation memory held between forward and backward.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, labels=labels).mean()
    return sum(storage.nbytes() for storage in storages.values()), loss


# ---- an independent reference: plain [b, s, h] math over the full weights, no model code ---------------


def _norm(cfg: MegatronConfig, x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    weight = state[prefix + ".weight"]
    if cfg.layernorm_zero_centered_gamma:
        weight = weight + 1
    if cfg.normalization == "RMSNorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.layernorm_epsilon) * weight
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + cfg.layernorm_epsilon) * weight + state[prefix + ".bias"]


def rope_frequencies(cfg: MegatronConfig) -> torch.Tensor:
    """[dim/2] float64 base^(-2i/dim), with Llama 3.1's piecewise scaling (1, 4, 8192) under --use-rope-scaling."""
    dim = int(cfg.kv_channels * cfg.rotary_percent)
    freqs = cfg.rotary_base ** (-torch.arange(dim // 2, dtype=torch.float64) * 2 / dim)
    if not cfg.use_rope_scaling:
        return freqs
    factor, scaled = cfg.rope_scaling_factor, []
    for f in freqs.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < 8192 / 4:  # high frequencies: unchanged
            scaled.append(f)
        elif wavelength > 8192 / 1:  # low frequencies: divided by the factor
            scaled.append(f / factor)
        else:  # between: a blend, linear in 8192 / wavelength
            t = (8192 / wavelength - 1) / (4 - 1)
            scaled.append((1 - t) * f / factor + t * f)
    return torch.tensor(scaled, dtype=torch.float64)


def _rope(x: torch.Tensor, positions: torch.Tensor, cfg: MegatronConfig) -> torch.Tensor:
    """Rotate channel pairs of the first dim channels by position * frequency, via complex numbers: pairs
    (i, i + dim/2), or (2i, 2i + 1) with --rotary-interleaved; positions divided by the interpolation factor."""
    dim = int(cfg.kv_channels * cfg.rotary_percent)
    half = dim // 2
    positions = positions.double()
    if cfg.rotary_seq_len_interpolation_factor is not None:
        positions = positions / cfg.rotary_seq_len_interpolation_factor
    angle = positions[:, :, None, None] * rope_frequencies(cfg)  # [b, s, 1, half]
    x_rot = x[..., :dim].double()
    if cfg.rotary_interleaved:
        first, second = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        first, second = x_rot[..., :half], x_rot[..., half:]
    pairs = torch.complex(first, second) * torch.polar(torch.ones_like(angle), angle)
    if cfg.rotary_interleaved:
        rotated = torch.stack([pairs.real, pairs.imag], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([pairs.real, pairs.imag], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., dim:]], dim=-1)


def _linear(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    out = x @ state[prefix + ".weight"].t()
    bias = state.get(prefix + ".bias")
    return out if bias is None else out + bias


def _activation(cfg: MegatronConfig, x: torch.Tensor) -> torch.Tensor:
    if cfg.swiglu:
        gate, up = x[..., : cfg.ffn_hidden_size], x[..., cfg.ffn_hidden_size :]
        return gate * torch.sigmoid(gate) * up
    if cfg.squared_relu:
        return x.clamp(min=0) ** 2
    if cfg.openai_gelu:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention_keep_mask(cfg: MegatronConfig, s: int) -> torch.Tensor:
    """[s, s] True where query i may attend to key j: j <= i, and j >= i - left with --window-size left,0."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    keep = j <= i
    if cfg.window_size is not None and cfg.window_size[0] >= 0:
        keep &= j >= i - cfg.window_size[0]
    return keep


def reference_logits(cfg: MegatronConfig, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab_size] of a GPT with full weights `state` (Megatron names), written plainly."""
    b, s = tokens.shape
    a, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    positions = torch.arange(s).expand(b, s)
    x = state["embedding.word_embeddings.weight"][tokens]
    if cfg.position_embedding_type == "learned_absolute":
        x = x + state["embedding.position_embeddings.weight"][positions]
    keep = attention_keep_mask(cfg, s)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        qkv = _linear(_norm(cfg, x, state, p + "input_layernorm"), state, p + "self_attention.linear_qkv")
        qkv = qkv.view(b, s, g, a // g + 2, d)  # per group: a/g query heads, then k, then v
        q = qkv[:, :, :, : a // g].reshape(b, s, a, d)
        k, v = qkv[:, :, :, a // g], qkv[:, :, :, a // g + 1]  # [b, s, g, d]
        if cfg.qk_layernorm:  # one norm over head_dim, shared by the heads
            q = _norm(cfg, q, state, p + "self_attention.q_layernorm")
            k = _norm(cfg, k, state, p + "self_attention.k_layernorm")
        if cfg.position_embedding_type == "rope":
            q, k = _rope(q, positions, cfg), _rope(k, positions, cfg)
        heads = []
        for h in range(a):
            group = h // (a // g)
            scores = q[:, :, h] @ k[:, :, group].transpose(1, 2) / math.sqrt(d)  # [b, s, s]
            probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
            heads.append(probs @ v[:, :, group])
        x = x + _linear(torch.cat(heads, dim=-1), state, p + "self_attention.linear_proj")
        hidden = _linear(_norm(cfg, x, state, p + "pre_mlp_layernorm"), state, p + "mlp.linear_fc1")
        x = x + _linear(_activation(cfg, hidden), state, p + "mlp.linear_fc2")
    x = _norm(cfg, x, state, "decoder.final_layernorm")
    out_weight = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    return (x @ out_weight.t())[..., : cfg.vocab_size]
