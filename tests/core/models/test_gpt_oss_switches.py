"""gpt-oss's architecture switches against Megatron's formulas and HF's GptOss: quick GeGLU with clamp and offset,
attention sinks (--softmax-type), alternating sliding-window layers, YaRN RoPE (--enable-gpt-oss), TP=2, checkpoints."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpt"))  # gpt_helpers, next to the GPT tests

from dist_utils import run_distributed  # noqa: E402
from gpt_helpers import LLAMA_STYLE, batch, full_state, make_config, train_and_gather  # noqa: E402

from megatron_lite.core.models.gpt import GPTModel  # noqa: E402
from megatron_lite.core.models.gpt.attention import DotProductAttention  # noqa: E402
from megatron_lite.core.models.gpt.mlp import MLP, activation_func, swiglu  # noqa: E402
from megatron_lite.core.models.gpt.rope import GPT_OSS_YARN, RotaryEmbedding, YarnScaling, yarn_inv_freq  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.parallel_state import initialize_parallel  # noqa: E402

# The gpt-oss example line's architecture (Megatron-LM examples/gptoss), on the tiny dense model.
GPT_OSS = dict(
    LLAMA_STYLE,
    swiglu=False,
    quick_geglu=True,
    glu_linear_offset=1.0,
    activation_func_clamp_value=7.0,
    softmax_type="learnable",
    window_size="5,0",
    window_attn_skip_freq=2,
    enable_gpt_oss=True,
)


def _megatron_glu(x: torch.Tensor, act, offset: float, clamp: float | None) -> torch.Tensor:
    """megatron/core/transformer/mlp.py's unfused glu(), written out in float64."""
    x_glu, x_linear = torch.chunk(x.double(), 2, dim=-1)
    if clamp is not None:
        x_glu = x_glu.clamp(min=None, max=clamp)
        x_linear = x_linear.clamp(min=-clamp, max=clamp)
    return act(x_glu) * (x_linear + offset)


def _quick_gelu64(y: torch.Tensor) -> torch.Tensor:
    return y * torch.sigmoid(1.702 * y)  # fused_bias_geglu.quick_gelu


# ---- the MLP activation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("switches", "act"),
    [
        (dict(quick_geglu=True), _quick_gelu64),
        (dict(quick_geglu=True, glu_linear_offset=1.0, activation_func_clamp_value=7.0), _quick_gelu64),
        (dict(quick_geglu=True, glu_linear_offset=-0.5), _quick_gelu64),
        (dict(swiglu=True, activation_func_clamp_value=7.0, num_experts=2), F.silu),
        (dict(swiglu=True, glu_linear_offset=1.0), F.silu),
    ],
)
def test_gated_activation_matches_megatrons_glu(switches, act):
    cfg = make_config(**switches)
    assert cfg.gated_linear_unit
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 6  # |x| > 7 occurs: clamps bind
    assert (x.abs() > 7).any()
    got = activation_func(cfg)(x)
    expected = _megatron_glu(x, act, cfg.glu_linear_offset, cfg.activation_func_clamp_value)
    assert got.shape == (3, 5, 32)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-6)
    # The clamp changes the answer wherever it binds (the test could not pass without it).
    if cfg.activation_func_clamp_value is not None:
        unclamped = _megatron_glu(x, act, cfg.glu_linear_offset, None)
        assert (unclamped - expected).abs().max() > 1.0


def test_plain_swiglu_keeps_its_function_and_mlp_width():
    cfg = make_config(swiglu=True)
    assert activation_func(cfg) is swiglu  # the default path is the very same code
    mlp = MLP(make_config(quick_geglu=True, ffn_hidden_size=48))
    assert mlp.linear_fc1.weight.shape == (96, 32)  # [gate; up]
    assert mlp.linear_fc2.weight.shape == (32, 48)
    assert not make_config().gated_linear_unit


def test_dense_quick_geglu_mlp_equals_hf_gpt_oss_expert():
    """Our MLP with gpt-oss's activation against HF's GptOssExperts with one expert (routing weight 1)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = make_config(
        quick_geglu=True, glu_linear_offset=1.0, activation_func_clamp_value=7.0, init_method_std=0.5
    )
    mlp = MLP(cfg).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mlp.linear_fc1.bias.copy_(torch.randn(mlp.linear_fc1.bias.shape, generator=gen))
        mlp.linear_fc2.bias.copy_(torch.randn(mlp.linear_fc2.bias.shape, generator=gen))
    ffn, h = cfg.ffn_hidden_size, cfg.hidden_size
    hf_cfg = transformers.GptOssConfig(
        hidden_size=h, intermediate_size=ffn, num_local_experts=1, swiglu_limit=7.0
    )
    experts = GptOssExperts(hf_cfg).double()
    w1, b1 = mlp.linear_fc1.weight.detach(), mlp.linear_fc1.bias.detach()
    with torch.no_grad():  # HF interleaves gate (even columns) and up (odd columns) and stores x @ W
        experts.gate_up_proj[0, :, 0::2] = w1[:ffn].t()
        experts.gate_up_proj[0, :, 1::2] = w1[ffn:].t()
        experts.gate_up_proj_bias[0, 0::2] = b1[:ffn]
        experts.gate_up_proj_bias[0, 1::2] = b1[ffn:]
        experts.down_proj[0] = mlp.linear_fc2.weight.detach().t()
        experts.down_proj_bias[0] = mlp.linear_fc2.bias.detach()
    x = torch.randn(6, 2, h, generator=gen, dtype=torch.float64)
    tokens = x.reshape(-1, h)
    with torch.no_grad():
        ours = mlp(x).reshape(-1, h)
        hf = experts(tokens, torch.zeros(12, 1, dtype=torch.long), torch.ones(12, 1, dtype=torch.float64))
        clamp_binds = (F.linear(tokens, w1, b1).abs() > 7).any()
    assert clamp_binds
    torch.testing.assert_close(ours, hf, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(quick_geglu=True, swiglu=True), "--quick-geglu picks the MLP's activation"),
        (
            dict(swiglu=True, activation_func_clamp_value=7.0),
            "--activation-func-clamp-value with --swiglu needs MoE",
        ),
        (
            dict(swiglu=True, activation_func_clamp_value=-1.0),
            "--activation-func-clamp-value must be positive",
        ),
        (dict(window_attn_skip_freq=2), "--window-attn-skip-freq picks which layers use --window-size"),
        (
            dict(window_size="4,0", window_attn_skip_freq="[1,0,1]"),
            "--window-attn-skip-freq [1,0,1]: the pattern has 3",
        ),
        (
            dict(window_size="4,0", window_attn_skip_freq="[1,2]"),
            "--window-attn-skip-freq [1,2]: the pattern may only",
        ),
        (
            dict(window_size="4,0", window_attn_skip_freq="__import__('os')"),
            "--window-attn-skip-freq __import__",
        ),
        (dict(window_size="4,0", window_attn_skip_freq=0), "--window-attn-skip-freq 0: an integer frequency"),
        (dict(enable_gpt_oss=True), "--enable-gpt-oss switches RoPE to gpt-oss's YaRN: it needs"),
        (
            dict(LLAMA_STYLE, enable_gpt_oss=True, rotary_interleaved=True),
            "--enable-gpt-oss: YaRN RoPE does not",
        ),
    ],
)
def test_bad_switches_are_one_line(overrides, message):
    with pytest.raises(UserError) as caught:
        make_config(**overrides)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# ---- attention sinks ------------------------------------------------------------------------------------


def _sink_reference(q, k, v, offset, window_left=None):
    """Megatron's DotProductAttention + SoftmaxOne in float64: q [sq, b, n, d], k/v [sk, b, g, d] -> [sq, b, n*d]."""
    sq, b, n, d = q.shape
    sk, g = k.shape[0], k.shape[2]
    k = k.double().repeat_interleave(n // g, dim=2)
    v = v.double().repeat_interleave(n // g, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q.double(), k) / math.sqrt(d)
    queries = torch.arange(sk - sq, sk)[:, None]
    keys = torch.arange(sk)[None, :]
    masked = keys > queries
    if window_left is not None:
        masked = masked | (keys < queries - window_left)
    scores = scores.masked_fill(masked, float("-inf"))
    sink = offset.double().reshape(1, -1, 1, 1).expand(b, n, sq, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(sq, b, n * d)


def _qkv(sq=9, sk=9, b=2, n=4, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, n, d, generator=gen)
    k = torch.randn(sk, b, g, d, generator=gen)
    v = torch.randn(sk, b, g, d, generator=gen)
    return q, k, v


@pytest.mark.parametrize("window_left", [None, 3])
@pytest.mark.parametrize("shape", [dict(sq=9, sk=9), dict(sq=4, sk=9), dict(sq=1, sk=9)])
def test_attention_with_sinks_matches_float64_reference(window_left, shape):
    q, k, v = _qkv(**shape)
    offset = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    attn = DotProductAttention(0.0, 4, 2, 8, window_left=window_left, softmax_offset=offset).eval()
    got = attn(q, k, v)
    expected = _sink_reference(q, k, v, offset.detach(), window_left)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    vanilla = DotProductAttention(0.0, 4, 2, 8, window_left=window_left).eval()(q, k, v)
    assert (vanilla - got).abs().max() > 1e-2  # the sinks change the output


def test_sink_gradient_matches_float64_autograd():
    q, k, v = _qkv()
    offset = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    attn = DotProductAttention(0.0, 4, 2, 8, softmax_offset=offset)
    weights = torch.randn(9, 2, 32, generator=torch.Generator().manual_seed(5))
    (attn(q, k, v) * weights).sum().backward()
    offset64 = offset.detach().double().requires_grad_()
    (_sink_reference(q, k, v, offset64) * weights.double()).sum().backward()
    torch.testing.assert_close(offset.grad.double(), offset64.grad, atol=1e-6, rtol=0)
    assert offset.grad.abs().min() > 0


def test_off_by_one_is_a_zero_sink_and_vanilla_is_sdpa_bit_for_bit():
    q, k, v = _qkv()
    cfg = make_config(softmax_type="off-by-one")
    model = GPTModel(cfg)
    core = model.decoder.layers[0].self_attention.core_attention
    assert torch.equal(core.softmax_offset, torch.zeros(4))
    assert not any("softmax_offset" in name for name in model.state_dict())  # not a parameter, not saved
    got = DotProductAttention(0.0, 4, 2, 8, softmax_offset=torch.zeros(4))(q, k, v)
    torch.testing.assert_close(got.double(), _sink_reference(q, k, v, torch.zeros(4)), atol=1e-6, rtol=0)
    vanilla = DotProductAttention(0.0, 4, 2, 8)(q, k, v)
    sdpa = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), is_causal=True, enable_gqa=True
    )
    assert torch.equal(vanilla, sdpa.permute(2, 0, 1, 3).reshape(9, 2, 32))


def test_attention_with_sinks_equals_hf_gpt_oss_eager_attention():
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv(d=16)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups = sinks, 2
    module.eval()
    for window_left in (None, 4):
        queries, keys = torch.arange(9)[:, None], torch.arange(9)[None, :]
        masked = (keys > queries) | ((keys < queries - window_left) if window_left is not None else False)
        mask = torch.zeros(9, 9).masked_fill(masked, float("-inf"))
        hf, _ = eager_attention_forward(
            module, q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), mask, 0.25
        )  # [b, sq, n, d]
        ours = DotProductAttention(0.0, 4, 2, 16, window_left=window_left, softmax_offset=sinks)(q, k, v)
        torch.testing.assert_close(ours, hf.permute(1, 0, 2, 3).reshape(9, 2, 64), atol=1e-6, rtol=0)


def test_kv_cache_decoding_with_gpt_oss_switches_equals_full_forward():
    cfg = make_config(**GPT_OSS)
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg)
    with torch.no_grad():
        expected = model(tokens)
        cache = model.init_kv_cache(2, cfg.seq_length)
        steps = [model(tokens[:, :6], kv_cache=cache)]
        steps += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(6, cfg.seq_length)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=2e-5, rtol=0)


def test_selective_recompute_of_core_attention_keeps_the_sink_gradient():
    grads = {}
    for recompute in (False, True):
        cfg = make_config(**GPT_OSS, recompute_activations=recompute)
        model = GPTModel(cfg)
        tokens, labels = batch(cfg)
        model(tokens, labels=labels).mean().backward()
        grads[recompute] = full_state(model, None, grads=True)
    name = "decoder.layers.0.self_attention.core_attention.softmax_offset"
    assert grads[True][name].abs().min() > 0
    for key, grad in grads[False].items():
        torch.testing.assert_close(grads[True][key], grad, atol=1e-6, rtol=0, msg=key)


# ---- which layers slide, and YaRN ---------------------------------------------------------------------


def _megatron_is_window(window_size, freq, layer_number: int) -> bool:
    """megatron/core/transformer/utils.py is_layer_window_attention (layer_number counts from 1)."""
    if not window_size:
        return False
    if freq is None:
        return True
    if isinstance(freq, int):
        return layer_number % freq != 0
    return bool(freq[layer_number - 1])


@pytest.mark.parametrize(
    ("freq", "parsed"),
    [
        (None, None),
        (2, 2),
        ("3", 3),
        ("[1,1,0]*2", [1, 1, 0, 1, 1, 0]),
        ("([1]*2+[0])*2", [1, 1, 0, 1, 1, 0]),
        ("[0,1,1,1,1,0]", [0, 1, 1, 1, 1, 0]),
        ([1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0]),
    ],
)
def test_window_attn_skip_freq_picks_megatrons_layers(freq, parsed):
    cfg = make_config(num_layers=6, window_size="3,0", window_attn_skip_freq=freq)
    assert cfg.window_attn_skip_freq == parsed
    model = GPTModel(cfg)
    got = [layer.self_attention.core_attention.window_left for layer in model.decoder.layers]
    expected = [3 if _megatron_is_window((3, 0), parsed, n + 1) else None for n in range(6)]
    assert got == expected
    if freq is not None:
        assert None in got and 3 in got


def _megatron_yarn_inv_freq(dim, base, factor, original, beta_fast, beta_slow, round_to_int):
    """yarn_rotary_pos_embedding.py's inv_freq, written out in float64."""

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    mask = 1.0 - ramp
    extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return extra / factor * (1 - mask) + extra * mask


@pytest.mark.parametrize(
    "yarn", [GPT_OSS_YARN, YarnScaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707, True), YarnScaling(4.0, 2048)]
)
@pytest.mark.parametrize("dim", [16, 64])
def test_yarn_inv_freq_and_mscale_match_megatrons_formula(yarn, dim):
    inv_freq, mscale = yarn_inv_freq(dim, 10000.0, yarn)
    expected = _megatron_yarn_inv_freq(
        dim,
        10000.0,
        yarn.scaling_factor,
        yarn.original_max_position_embeddings,
        yarn.beta_fast,
        yarn.beta_slow,
        yarn.correction_range_round_to_int,
    )
    torch.testing.assert_close(inv_freq.double(), expected, atol=0, rtol=1e-6)

    def get_mscale(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    expected_mscale = get_mscale(yarn.scaling_factor, yarn.mscale) / get_mscale(
        yarn.scaling_factor, yarn.mscale_all_dim
    )
    assert mscale == pytest.approx(expected_mscale, rel=1e-12)
    plain = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    assert (inv_freq.double() / plain - 1).abs().max() > 0.4  # the lowest frequencies really are stretched


def test_gpt_oss_yarn_equals_hf_yarn_rope_init():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    assert GPT_OSS_YARN == YarnScaling(32.0, 131072, 32.0, 1.0, 1.0, 0.0, False)  # model_builder.py's values
    config = transformers.GptOssConfig(
        head_dim=64, hidden_size=256, num_attention_heads=4, max_position_embeddings=64
    )
    config.rope_parameters = dict(
        config.rope_parameters, rope_theta=10000.0, original_max_position_embeddings=131072, factor=32.0
    )
    hf_inv_freq, hf_attention_factor = _compute_yarn_parameters(config)
    inv_freq, mscale = yarn_inv_freq(64, 10000.0, GPT_OSS_YARN)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), atol=0, rtol=1e-6)
    assert mscale == pytest.approx(hf_attention_factor, rel=1e-12)
    assert mscale == pytest.approx(0.1 * math.log(32) + 1)
    rope = RotaryEmbedding(64, yarn=GPT_OSS_YARN)
    cos, sin = rope(torch.arange(7)[None, :])
    angles = torch.arange(7, dtype=torch.float64)[:, None] * hf_inv_freq.double()[None, :]
    angles = torch.cat([angles, angles], -1)
    torch.testing.assert_close(cos[:, 0, 0].double(), angles.cos() * hf_attention_factor, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, 0, 0].double(), angles.sin() * hf_attention_factor, atol=1e-5, rtol=0)


def test_enable_gpt_oss_changes_only_the_rope():
    on, off = make_config(**LLAMA_STYLE, enable_gpt_oss=True), make_config(**LLAMA_STYLE)
    model_on, model_off = GPTModel(on), GPTModel(off)
    assert model_on.rotary_pos_emb.yarn == GPT_OSS_YARN and model_off.rotary_pos_emb.yarn is None
    for a, b in zip(model_on.state_dict().values(), model_off.state_dict().values()):
        assert torch.equal(a, b)  # the same weights (YaRN has none)
    tokens, _ = batch(on)
    with torch.no_grad():
        assert (model_on(tokens) - model_off(tokens)).abs().max() > 1e-3


# ---- TP=2, checkpoints, export --------------------------------------------------------------------------

TP_CASES = {"gpt-oss": GPT_OSS, "gpt-oss-sp": dict(GPT_OSS, sequence_parallel=True)}


def _tp_worker(rank, world_size):
    pstate = initialize_parallel(2, device="cpu")
    out = {}
    for name, overrides in TP_CASES.items():
        cfg = make_config(world_size=2, tensor_model_parallel_size=2, **overrides)
        model = GPTModel(cfg, pstate)
        out[name] = train_and_gather(model, cfg, pstate.tp_group)
        out[name]["local_offset"] = model.decoder.layers[
            0
        ].self_attention.core_attention.softmax_offset.detach()
    return out


def test_tp2_with_gpt_oss_switches_equals_tp1():
    results = run_distributed(_tp_worker, 2)
    for name, overrides in TP_CASES.items():
        cfg = make_config(**overrides)
        expected = train_and_gather(GPTModel(cfg), cfg, None)
        offset = "decoder.layers.0.self_attention.core_attention.softmax_offset"
        for rank, got in enumerate(results):
            got = got[name]
            # Each rank holds the sinks of its own two heads.
            assert torch.equal(got["local_offset"], expected["weights"][offset][2 * rank : 2 * rank + 2])
            for key, value in expected["weights"].items():
                tp2 = (
                    got["weights"][key][: value.shape[0]]
                    if "embedding" in key or "output" in key
                    else got["weights"][key]
                )
                assert torch.equal(tp2, value), (rank, key)
            for key, grad in expected["grads"].items():
                tp2 = got["grads"][key][: grad.shape[0]]
                torch.testing.assert_close(tp2, grad, atol=1e-5, rtol=0, msg=f"{name} rank {rank} grad {key}")
            assert got["grads"][offset].abs().min() > 0
            torch.testing.assert_close(
                got["logits"][..., : cfg.vocab_size], expected["logits"], atol=1e-5, rtol=0
            )


def test_softmax_offset_is_saved_loaded_and_the_switches_are_checked(tmp_path):
    from megatron_lite.training.checkpointing import load_checkpoint, save_checkpoint

    cfg = make_config(**GPT_OSS, no_load_optim=True, no_load_rng=True)
    model = GPTModel(cfg)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.softmax_offset.add_(torch.arange(4.0))
    save_checkpoint(tmp_path, 1, model, None, None, cfg, None, consumed_train_samples=2)
    other_cfg = make_config(**GPT_OSS, no_load_optim=True, no_load_rng=True, seed=99)
    other = GPTModel(other_cfg)
    name = "decoder.layers.1.self_attention.core_attention.softmax_offset"
    assert not torch.equal(other.state_dict()[name], model.state_dict()[name])
    load_checkpoint(tmp_path, other, None, None, other_cfg, None)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    for changed, shown in [
        (dict(softmax_type="off-by-one"), "--softmax-type learnable in the checkpoint, off-by-one given"),
        (dict(window_attn_skip_freq=3), "--window-attn-skip-freq 2 in the checkpoint, 3 given"),
        (dict(glu_linear_offset=0.0), "--glu-linear-offset 1.0 in the checkpoint, 0.0 given"),
        (dict(enable_gpt_oss=False), "--enable-gpt-oss on in the checkpoint, off given"),
    ]:
        cfg2 = make_config(**{**GPT_OSS, **changed}, no_load_optim=True, no_load_rng=True)
        with pytest.raises(UserError) as caught:
            load_checkpoint(tmp_path, GPTModel(cfg2), None, None, cfg2, None)
        assert shown in str(caught.value)


def test_hf_export_refuses_gpt_oss_switches_in_one_line(tmp_path):
    pytest.importorskip("transformers")
    from megatron_lite.convert.hf_export import export_to_hf
    from megatron_lite.training.checkpointing import save_checkpoint

    cfg = make_config(**LLAMA_STYLE, softmax_type="learnable")
    save_checkpoint(tmp_path / "ckpt", 1, GPTModel(cfg), None, None, cfg, None, consumed_train_samples=2)
    with pytest.raises(UserError) as caught:
        export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert str(caught.value).startswith("cannot export: --softmax-type learnable is set")
    assert not (tmp_path / "hf").exists()
