"""Megatron's architecture switches: each one against the plain reference, and each one changes the logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import LLAMA_STYLE, batch, make_config, reference_logits, rope_frequencies

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.models.gpt.norms import LayerNorm, RMSNorm
from megatron_lite.core.models.gpt.rope import RotaryEmbedding, apply_rotary_pos_emb
from megatron_lite.training.checkpointing import (
    CHECKSUMS_FILENAME,
    COMMON_FILENAME,
    file_checksum,
    iteration_dir_name,
    load_model_weights,
    load_saved_config,
    save_checkpoint,
)
from megatron_lite.training.checkpointing.chunks import load_pickled

ROPE_SCALING = dict(use_rope_scaling=True, rope_scaling_factor=4.0, rotary_base=1000000, kv_channels=16)
# name: (the switch on top of its base style, the same config with the switch off)
SWITCHES = {
    "exact-gelu": ({}, dict(openai_gelu=True)),
    "openai-gelu": (dict(openai_gelu=True), {}),
    "squared-relu": (dict(squared_relu=True), {}),
    "qk-layernorm-layernorm": (dict(qk_layernorm=True), {}),
    "qk-layernorm-rmsnorm": (dict(LLAMA_STYLE, qk_layernorm=True), LLAMA_STYLE),
    "layernorm-1p": (dict(layernorm_zero_centered_gamma=True), {}),
    "rmsnorm-1p-qk": (
        dict(LLAMA_STYLE, layernorm_zero_centered_gamma=True, qk_layernorm=True),
        dict(LLAMA_STYLE, qk_layernorm=True),
    ),
    "rotary-interleaved": (dict(LLAMA_STYLE, rotary_interleaved=True), LLAMA_STYLE),
    "rope-scaling": (
        dict(LLAMA_STYLE, **ROPE_SCALING),
        dict(LLAMA_STYLE, **{**ROPE_SCALING, "use_rope_scaling": False}),
    ),
    "interpolation": (dict(LLAMA_STYLE, rotary_seq_len_interpolation_factor=4), LLAMA_STYLE),
    "window": (dict(window_size="3,0"), {}),
    "window-llama": (dict(LLAMA_STYLE, window_size="(5, 0)"), LLAMA_STYLE),
    "everything": (
        dict(
            LLAMA_STYLE,
            **ROPE_SCALING,
            qk_layernorm=True,
            layernorm_zero_centered_gamma=True,
            rotary_interleaved=True,
            window_size="4,0",
        ),
        dict(LLAMA_STYLE, **ROPE_SCALING, qk_layernorm=True, layernorm_zero_centered_gamma=True),
    ),
}
# fp32 model against the reference (fp32, its RoPE in fp64): the perturbed weights amplify rounding, so
# the bound scales with the logits (~7 here, so ~3e-5); a switch turned off moves them 45x that or more.
RTOL = 4e-6


def perturbed_model(cfg: MegatronConfig, seed: int = 0) -> GPTModel:
    """A model whose every weight (norms included) is away from its init, so a misused one shows."""
    model = GPTModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_matches_the_reference_and_changes_the_logits(name):
    on, off = SWITCHES[name]
    cfg = make_config(init_method_std=0.1, **on)
    model = perturbed_model(cfg)
    tokens, _ = batch(cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(tokens)[..., : cfg.vocab_size]
    expected = reference_logits(cfg, state, tokens)
    atol = RTOL * expected.abs().max().item()
    diff = (logits - expected).abs().max().item()
    assert diff < atol, (diff, atol)
    without = reference_logits(make_config(init_method_std=0.1, **off), state, tokens)
    assert (logits - without).abs().max() > 20 * atol  # the switch is not a no-op the test could miss


def test_mlp_activations_are_megatrons():
    x = torch.randn(3, 2, 32)
    for overrides, formula in [
        ({}, lambda y: y * 0.5 * (1 + torch.erf(y / math.sqrt(2)))),
        (
            dict(openai_gelu=True),
            lambda y: 0.5 * y * (1 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y**3))),
        ),
        (dict(squared_relu=True), lambda y: torch.where(y > 0, y * y, torch.zeros_like(y))),
    ]:
        mlp = MLP(make_config(**overrides))
        fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
        expected = formula(x @ fc1.weight.t() + fc1.bias) @ fc2.weight.t() + fc2.bias
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)
    y = torch.linspace(-3, 3, 101)
    assert (F.gelu(y) - F.gelu(y, approximate="tanh")).abs().max() > 1e-4  # the two GELUs are not the same


def test_old_checkpoints_without_openai_gelu_load_with_the_tanh_gelu_they_were_trained_with(tmp_path):
    tanh = make_config(openai_gelu=True, init_method_std=0.3)
    model = GPTModel(tanh).eval()
    save_checkpoint(tmp_path, 1, model, None, None, tanh, None, consumed_train_samples=0)
    # Rewrite the saved config as this project wrote it before --openai-gelu existed.
    ckpt = tmp_path / iteration_dir_name(1)
    common = load_pickled((ckpt / COMMON_FILENAME).read_bytes())
    del common["megatron_lite"]["config"]["openai_gelu"]
    torch.save(common, ckpt / COMMON_FILENAME)
    manifest = ckpt / CHECKSUMS_FILENAME
    import json

    checksums = json.loads(manifest.read_text())
    checksums["files"][COMMON_FILENAME] = file_checksum(ckpt / COMMON_FILENAME)
    manifest.write_text(json.dumps(checksums))

    saved = load_saved_config(tmp_path)
    assert saved.openai_gelu is True
    loaded = GPTModel(saved).eval()
    load_model_weights(loaded, tmp_path)
    tokens, _ = batch(tanh)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
        exact = GPTModel(make_config(init_method_std=0.3)).eval()
        exact.load_state_dict(model.state_dict())
        assert (exact(tokens) - model(tokens)).abs().max() > 1e-4  # so the legacy default matters


def test_from_dict_legacy_gelu_default_only_for_gelu_models():
    values = make_config().to_dict()
    del values["openai_gelu"]
    assert MegatronConfig.from_dict(values).openai_gelu is True
    for activation in ("swiglu", "squared_relu"):
        assert MegatronConfig.from_dict({**values, activation: True}).openai_gelu is False
    assert MegatronConfig.from_dict({**values, "openai_gelu": False}).openai_gelu is False
    assert make_config().openai_gelu is False  # new runs: Megatron's exact GELU


@pytest.mark.parametrize("norm_class", [LayerNorm, RMSNorm])
def test_apply_layernorm_1p_stores_w_from_zero_and_scales_by_one_plus_w(norm_class):
    norm = norm_class(6, eps=1e-5, zero_centered_gamma=True)
    assert torch.equal(norm.weight, torch.zeros(6))
    plain = norm_class(6, eps=1e-5)
    x = torch.randn(4, 6)
    assert torch.equal(norm(x), plain(x))  # at init both scale by exactly 1
    w = torch.linspace(-0.5, 0.5, 6)
    with torch.no_grad():
        norm.weight.copy_(w)
        plain.weight.copy_(1 + w)
    torch.testing.assert_close(norm(x), plain(x), atol=1e-6, rtol=0)
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    centred = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = (rms if norm_class is RMSNorm else centred) * (1 + w)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=0)


def test_apply_layernorm_1p_model_equals_the_plain_model_at_init():
    for style in ({}, LLAMA_STYLE):
        cfg, plain = make_config(layernorm_zero_centered_gamma=True, **style), make_config(**style)
        tokens, _ = batch(cfg)
        model = GPTModel(cfg)
        norms = [p for n, p in model.named_parameters() if "layernorm" in n and n.endswith("weight")]
        assert norms and all(torch.count_nonzero(p) == 0 for p in norms)
        with torch.no_grad():
            assert torch.equal(model(tokens), GPTModel(plain)(tokens))


def test_qk_layernorm_is_one_norm_over_head_dim_per_layer():
    params = dict(GPTModel(make_config(qk_layernorm=True, kv_channels=16)).named_parameters())
    for i in range(2):
        for which in ("q", "k"):
            for kind in ("weight", "bias"):
                name = f"decoder.layers.{i}.self_attention.{which}_layernorm.{kind}"
                assert params[name].shape == (16,) and not params[name].tensor_model_parallel
    llama = dict(GPTModel(make_config(qk_layernorm=True, **LLAMA_STYLE)).named_parameters())
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in llama
    assert "decoder.layers.0.self_attention.q_layernorm.bias" not in llama  # RMSNorm has no bias


def test_rotary_interleaved_rotates_adjacent_pairs():
    rope = RotaryEmbedding(kv_channels=8, rotary_base=100, rotary_interleaved=True)
    x = torch.randn(5, 2, 3, 8)  # [s, b, heads, d]
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    out = apply_rotary_pos_emb(x, *rope(positions), interleaved=True)
    for b in range(2):
        for t in range(5):
            for i in range(4):  # channel 2i pairs with channel 2i + 1
                angle = positions[b, t].item() * 100 ** (-2 * i / 8)
                x1, x2 = x[t, b, :, 2 * i], x[t, b, :, 2 * i + 1]
                torch.testing.assert_close(out[t, b, :, 2 * i], x1 * math.cos(angle) - x2 * math.sin(angle))
                torch.testing.assert_close(
                    out[t, b, :, 2 * i + 1], x2 * math.cos(angle) + x1 * math.sin(angle)
                )


def test_rope_scaling_frequencies_are_llama3s_piecewise_bands():
    cfg = make_config(**LLAMA_STYLE, **ROPE_SCALING)
    rope = RotaryEmbedding(16, 1.0, 1000000, rope_scaling=True, rope_scaling_factor=4.0)
    plain = RotaryEmbedding(16, 1.0, 1000000).inv_freq(torch.device("cpu")).double()
    scaled = rope.inv_freq(torch.device("cpu")).double()
    torch.testing.assert_close(scaled, rope_frequencies(cfg), atol=0, rtol=1e-6)
    wavelength = 2 * math.pi / plain
    high, low = wavelength < 2048, wavelength > 8192
    medium = ~high & ~low
    assert high.sum() >= 2 and medium.sum() >= 1 and low.sum() >= 2  # every band is exercised
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 4, atol=0, rtol=1e-6)
    assert ((scaled[medium] < plain[medium]) & (scaled[medium] > plain[medium] / 4)).all()


def test_interpolation_factor_divides_positions():
    cfg = make_config(**LLAMA_STYLE, rotary_seq_len_interpolation_factor=4, init_method_std=0.2)
    plain_cfg = make_config(**LLAMA_STYLE, init_method_std=0.2)
    model, plain = GPTModel(cfg).eval(), GPTModel(plain_cfg).eval()
    tokens, _ = batch(cfg)
    positions = torch.arange(cfg.seq_length).expand_as(tokens)
    with torch.no_grad():
        # Positions 4p seen through the factor 4 are positions p: the same angles to the bit.
        assert torch.equal(model(tokens, position_ids=4 * positions), plain(tokens, position_ids=positions))
        assert (model(tokens) - plain(tokens)).abs().max() > 1e-3
