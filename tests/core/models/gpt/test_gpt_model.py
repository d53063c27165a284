"""GPTModel on one process: parity with a plain reference, causality, init, padding, overfitting."""

import math

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import LLAMA_STYLE, batch, make_config, reference_logits

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.parallel_state import ParallelState

CONFIGS = {
    "gpt2": {},
    "gpt2-no-qkv-bias-untied": dict(disable_qkv_bias=True, untie_embeddings_and_output_weights=True),
    "llama": LLAMA_STYLE,
    "llama-partial-rope": dict(LLAMA_STYLE, rotary_percent=0.5, rotary_base=500),
    "gelu-rope-rmsnorm-bias": dict(position_embedding_type="rope", normalization="RMSNorm"),
    "mqa-swiglu-layernorm": dict(group_query_attention=True, num_query_groups=1, swiglu=True),
    "no-position-embedding": dict(position_embedding_type="none", add_bias_linear=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_match_plain_reference(name):
    cfg = make_config(**CONFIGS[name])
    model = GPTModel(cfg)
    tokens, labels = batch(cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = reference_logits(cfg, state, tokens)
        logits = model(tokens)
        loss = model(tokens, labels=labels)
    assert logits.shape == (2, cfg.seq_length, cfg.padded_vocab_size)
    torch.testing.assert_close(logits[..., : cfg.vocab_size], expected, atol=1e-5, rtol=0)
    expected_loss = F.cross_entropy(expected.transpose(1, 2), labels, reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)


def test_parameter_names_follow_megatron_core():
    names = set(dict(GPTModel(make_config()).named_parameters()))
    layer = {
        "input_layernorm.weight",
        "input_layernorm.bias",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.linear_proj.weight",
        "self_attention.linear_proj.bias",
        "pre_mlp_layernorm.weight",
        "pre_mlp_layernorm.bias",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1.bias",
        "mlp.linear_fc2.weight",
        "mlp.linear_fc2.bias",
    }
    expected = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight"}
    expected |= {f"decoder.layers.{i}.{n}" for i in range(2) for n in layer}
    expected |= {"decoder.final_layernorm.weight", "decoder.final_layernorm.bias"}
    assert names == expected
    llama = set(dict(GPTModel(make_config(**LLAMA_STYLE)).named_parameters()))
    assert "output_layer.weight" in llama and "embedding.position_embeddings.weight" not in llama
    assert not any(n.endswith(".bias") for n in llama)


def test_every_parameter_carries_tensor_parallel_attributes():
    model = GPTModel(make_config(**LLAMA_STYLE))
    sharded = {n for n, p in model.named_parameters() if p.tensor_model_parallel}
    assert sharded == {
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        *(
            f"decoder.layers.{i}.self_attention.{n}.weight"
            for i in range(2)
            for n in ("linear_qkv", "linear_proj")
        ),
        *(f"decoder.layers.{i}.mlp.{n}.weight" for i in range(2) for n in ("linear_fc1", "linear_fc2")),
    }
    dims = {n: (p.partition_dim, p.partition_stride) for n, p in model.named_parameters() if n in sharded}
    assert dims["decoder.layers.0.self_attention.linear_proj.weight"] == (1, 1)
    assert dims["decoder.layers.0.mlp.linear_fc1.weight"] == (0, 2)  # SwiGLU [gate; up]
    assert dims["output_layer.weight"] == (0, 1)
    assert all(p.tensor_model_parallel is False for n, p in model.named_parameters() if n not in sharded)


def test_future_token_never_changes_past_logits():
    cfg = make_config(**LLAMA_STYLE)
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert (before[:, 10:] - after[:, 10:]).abs().amax(dim=-1).min() > 1e-4


def test_explicit_causal_mask_matches_is_causal_path_and_document_mask_isolates_documents():
    cfg = make_config(**LLAMA_STYLE)
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg, batch_size=1)
    s = cfg.seq_length
    causal_mask = ~torch.ones(s, s, dtype=torch.bool).tril()[None, None]  # True = masked
    # Two documents of 8 tokens each: block attention across them and restart positions at the boundary.
    doc = torch.arange(s) // 8
    doc_mask = causal_mask | (doc[:, None] != doc[None, :])[None, None]
    positions = (torch.arange(s) % 8)[None]
    with torch.no_grad():
        plain = model(tokens)
        masked = model(tokens, attention_mask=causal_mask)
        docs = model(tokens, position_ids=positions, attention_mask=doc_mask)
        second_alone = model(tokens[:, 8:])
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(docs[:, :8], plain[:, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(docs[:, 8:], second_alone, atol=1e-5, rtol=0)


def test_loss_at_init_is_log_vocab():
    cfg = make_config(
        vocab_size=50257, make_vocab_size_divisible_by=128, hidden_size=64, seq_length=64, num_layers=2
    )
    assert cfg.padded_vocab_size == 50304
    model = GPTModel(cfg)
    tokens, labels = batch(cfg, batch_size=4)
    with torch.no_grad():
        loss = model(tokens, labels=labels).mean().item()
    assert abs(loss - math.log(50257)) < 0.1


def test_vocab_padding_does_not_change_the_loss():
    unpadded = GPTModel(make_config(make_vocab_size_divisible_by=1))
    cfg = make_config(make_vocab_size_divisible_by=128)
    padded = GPTModel(cfg)
    assert cfg.padded_vocab_size == 384
    words = padded.embedding.word_embeddings.weight
    assert torch.equal(words[:257], unpadded.embedding.word_embeddings.weight)
    assert torch.count_nonzero(words[257:]) == 0  # padding rows start at zero, drawn from no RNG
    with torch.no_grad():
        words[257:].normal_(0, 5.0)  # large padding logits would dominate if they were not excluded
    tokens, labels = batch(cfg)
    expected = unpadded(tokens, labels=labels)
    loss = padded(tokens, labels=labels)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    loss.sum().backward()
    # Padding rows get no gradient from the loss (nor from the lookup: no token id reaches them).
    assert torch.count_nonzero(words.grad[257:]) == 0


def test_init_distribution_and_zero_biases_unit_norms():
    cfg = make_config(num_layers=8, hidden_size=256, num_attention_heads=8, vocab_size=1000)
    model = GPTModel(cfg)
    params = dict(model.named_parameters())
    std = cfg.init_method_std
    scaled = std / math.sqrt(2 * cfg.num_layers)
    for name, expected in [
        ("embedding.word_embeddings.weight", std),
        ("decoder.layers.3.self_attention.linear_qkv.weight", std),
        ("decoder.layers.3.mlp.linear_fc1.weight", std),
        ("decoder.layers.3.self_attention.linear_proj.weight", scaled),
        ("decoder.layers.3.mlp.linear_fc2.weight", scaled),
    ]:
        assert abs(params[name].std().item() / expected - 1) < 0.02, name
        assert abs(params[name].mean().item()) < expected * 0.02, name
    for name, param in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        if "layernorm" in name and name.endswith("weight"):
            assert torch.equal(param, torch.ones_like(param)), name


def test_seed_fixes_the_weights_and_leaves_the_callers_rng_alone():
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    a = GPTModel(make_config(seed=5))
    assert torch.equal(torch.rand(3), expected_draw)
    b = GPTModel(make_config(seed=5))
    c = GPTModel(make_config(seed=6))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.std() > 0:
            assert not torch.equal(pa, pc), name


def test_config_errors_are_clear():
    from megatron_lite.config import MegatronConfig

    with pytest.raises(ValueError, match=r"finalized config"):
        GPTModel(MegatronConfig(num_layers=1, hidden_size=8, num_attention_heads=2))
    cfg = make_config()
    cfg.tensor_model_parallel_size = 2
    with pytest.raises(
        ValueError, match=r"--tensor-model-parallel-size 2 but the parallel state has a TP group of 1"
    ):
        GPTModel(cfg, ParallelState())


def test_tiny_model_overfits_one_batch():
    cfg = make_config(vocab_size=64, hidden_size=32, num_layers=2, seq_length=16)
    model = GPTModel(cfg)
    tokens, labels = batch(cfg, seed=3, batch_size=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(tokens, labels=labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    with torch.no_grad():
        final = model(tokens, labels=labels).mean().item()
    assert final < 0.1
