"""The switches as Megatron's flags: legacy position spellings, --window-size, and sliding-window attention."""

import math

import pytest
import torch
from gpt_helpers import LLAMA_STYLE, batch, make_config
from helpers import tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.models.gpt.attention import DotProductAttention
from megatron_lite.core.tensor_parallel import seed_model_parallel_rng
from megatron_lite.errors import UserError

FLAGS = tiny_flags(train_iters=1)


def config_of(extra: str):
    return parse_config(FLAGS + extra.split()).finalize(1, 257)


def error_of(extra: str) -> str:
    with pytest.raises(UserError) as err:
        config_of(extra)
    return str(err.value)


def test_each_switch_is_megatrons_flag_with_its_default():
    cfg = config_of("")
    defaults = {
        "openai_gelu": False,
        "squared_relu": False,
        "qk_layernorm": False,
        "layernorm_zero_centered_gamma": False,
        "rotary_interleaved": False,
        "use_rope_scaling": False,
        "rope_scaling_factor": 8.0,
        "rotary_seq_len_interpolation_factor": None,
        "window_size": None,
        "use_rotary_position_embeddings": False,
        "add_position_embedding": True,
        "recompute_modules": ["core_attn"],  # Megatron's TransformerConfig default
    }
    assert {name: getattr(cfg, name) for name in defaults} == defaults
    cfg = config_of(
        "--openai-gelu --qk-layernorm --apply-layernorm-1p --position-embedding-type rope --rotary-interleaved "
        "--use-rope-scaling --rope-scaling-factor 32 --rotary-seq-len-interpolation-factor 2 --window-size 7,0 "
        "--recompute-granularity selective --recompute-modules mlp layernorm"
    )
    got = [
        cfg.openai_gelu,
        cfg.qk_layernorm,
        cfg.layernorm_zero_centered_gamma,
        cfg.rotary_interleaved,
        cfg.use_rope_scaling,
        cfg.rope_scaling_factor,
        cfg.rotary_seq_len_interpolation_factor,
        cfg.window_size,
        cfg.recompute_modules,
    ]
    assert got == [True, True, True, True, True, 32.0, 2, (7, 0), ["mlp", "layernorm"]]
    assert config_of("--squared-relu").squared_relu


def test_window_size_takes_megatrons_tuple_spellings_and_yaml_lists(tmp_path):
    for text in ("4,0", "(4,0)", "(4, 0)", "-1,0"):
        cfg = parse_config([*FLAGS, f"--window-size={text}"]).finalize(1, 257)  # = for "-1,0"
        assert cfg.window_size == tuple(int(t) for t in text.strip("()").split(","))
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("window_size: [6, 0]\n")
    assert config_of(f"--yaml-cfg {yaml}").window_size == (6, 0)
    assert error_of("--window-size 4") == "--window-size 4: expected two integers left,right such as 4096,0"
    assert (
        error_of("--window-size 4,x") == "--window-size 4,x: expected two integers left,right such as 4096,0"
    )
    assert error_of("--window-size 4,2") == (
        "--window-size 4,2: right must be 0, a GPT attends only to earlier tokens (causal)"
    )
    assert (
        error_of("--window-size=-2,0")
        == "--window-size -2,0: left must be >= 0, or -1 for an unlimited window"
    )


def test_activation_and_position_flag_conflicts_are_one_line():
    assert error_of("--squared-relu --swiglu") == (
        "--squared-relu and --swiglu each pick the MLP's activation; give one of them"
    )
    assert error_of("--position-embedding-type rope --rotary-seq-len-interpolation-factor 0") == (
        "--rotary-seq-len-interpolation-factor must be positive, got 0"
    )
    assert (
        error_of("--use-rope-scaling --rope-scaling-factor 0")
        == "--rope-scaling-factor must be positive, got 0.0"
    )
    assert "not implemented" in error_of("--position-embedding-type yarn")


def test_legacy_use_rotary_position_embeddings_means_rope():
    cfg = config_of("--use-rotary-position-embeddings")
    assert cfg.position_embedding_type == "rope"
    model = GPTModel(cfg)
    assert model.rotary_pos_emb is not None and model.embedding.position_embeddings is None


def test_legacy_no_position_embedding_is_accepted_with_rope_only():
    cfg = config_of("--no-position-embedding --position-embedding-type rope")
    assert (cfg.add_position_embedding, cfg.position_embedding_type) == (False, "rope")
    # With rope there are no learned positions to drop: the model is the rope model.
    assert set(dict(GPTModel(cfg).named_parameters())) == set(
        dict(GPTModel(config_of("--position-embedding-type rope")).named_parameters())
    )
    assert error_of("--no-position-embedding") == (
        "--no-position-embedding is deprecated and only accepted with rope: use --position-embedding-type none "
        "(no position information) or rope"
    )


def test_position_embedding_type_none_has_no_position_information():
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    reversed_positions = torch.arange(15, -1, -1).expand(2, 16)
    for kind, position_free in (("none", True), ("learned_absolute", False), ("rope", False)):
        cfg = make_config(position_embedding_type=kind, init_method_std=0.2)
        model = GPTModel(cfg).eval()
        names = set(dict(model.named_parameters()))
        assert ("embedding.position_embeddings.weight" in names) == (kind == "learned_absolute")
        with torch.no_grad():
            same = torch.equal(model(tokens), model(tokens, position_ids=reversed_positions))
        assert same == position_free, kind


# ---- sliding-window attention ------------------------------------------------------------------------


def _masked_reference(q, k, v, left, offset):
    """q [sq, b, a, d], k/v [sk, b, a, d]; query i (at position offset + i) sees keys offset + i - left ..
    offset + i, written as an explicit mask."""
    sq, sk = q.shape[0], k.shape[0]
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    for i in range(sq):
        for j in range(sk):
            if not (offset + i - left <= j <= offset + i):
                scores[:, :, i, j] = float("-inf")
    out = torch.einsum("bhqk,kbhd->qbhd", torch.softmax(scores, -1), v.double())
    return out.reshape(sq, q.shape[1], -1).float()


@pytest.mark.parametrize("left", [0, 2, 5, 100])
def test_window_attention_matches_a_masked_reference(left):
    attn = DotProductAttention(0.0, num_heads=2, num_groups=2, head_dim=4, window_left=left).eval()
    gen = torch.Generator().manual_seed(left)
    q, k, v = (torch.randn(9, 2, 2, 4, generator=gen) for _ in range(3))
    torch.testing.assert_close(attn(q, k, v), _masked_reference(q, k, v, left, 0), atol=1e-6, rtol=0)
    # Four new queries after five cached positions, and a single decoding query after eight.
    torch.testing.assert_close(attn(q[5:], k, v), _masked_reference(q[5:], k, v, left, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(attn(q[8:], k, v), _masked_reference(q[8:], k, v, left, 8), atol=1e-6, rtol=0)
    if left < 8:
        full = DotProductAttention(0.0, num_heads=2, num_groups=2, head_dim=4).eval()
        assert (full(q, k, v) - attn(q, k, v)).abs().max() > 1e-2  # the window really masks


def test_window_attention_with_dropout_uses_the_same_window():
    """The explicit (dropout) path: a tiny dropout probability keeps every entry, so it must equal the mask."""
    seed_model_parallel_rng(1234)
    attn = DotProductAttention(1e-9, num_heads=2, num_groups=1, head_dim=4, window_left=2).train()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(7, 2, 2, 4, generator=gen),
        *(torch.randn(7, 2, 1, 4, generator=gen) for _ in range(2)),
    )
    expected = _masked_reference(q, k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1), 2, 0)
    torch.testing.assert_close(attn(q, k, v), expected, atol=1e-6, rtol=0)


def test_window_minus_one_is_unlimited():
    cfg, plain = make_config(window_size="-1,0", init_method_std=0.2), make_config(init_method_std=0.2)
    tokens, _ = batch(cfg)
    with torch.no_grad():
        assert torch.equal(GPTModel(cfg).eval()(tokens), GPTModel(plain).eval()(tokens))


def test_window_model_logits_depend_only_on_the_window():
    """With left = 3 over two layers, position t sees tokens t-6 .. t: changing token 0 moves positions
    0..6 only."""
    cfg = make_config(**LLAMA_STYLE, window_size="3,0", init_method_std=0.2)
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg)
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % cfg.vocab_size
    with torch.no_grad():
        moved = (model(tokens) - model(changed)).abs().amax(dim=(0, 2))  # [s]
    assert (moved[:7] > 1e-4).all() and torch.equal(moved[7:], torch.zeros(cfg.seq_length - 7))
