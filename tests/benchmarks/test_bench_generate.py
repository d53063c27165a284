"""benchmarks/bench_generate.py: the in-memory HF export, the token-equality check and a tiny end-to-end run."""

import pytest
import torch

from benchmarks import bench_generate
from benchmarks.bench_generate import Contender, compare_tokens, first_difference
from megatron_lite.core.models.gpt import GPTModel

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab=257, max_positions=32)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([], []) is None


def test_compare_tokens_names_the_first_difference():
    a = Contender("a", None, tokens=[4, 5, 6])
    b = Contender("b", None, tokens=[4, 5, 6])
    c = Contender("c", None, tokens=[4, 7, 6])
    same, lines = compare_tokens([a, b, c])
    assert not same
    assert lines == ["  b == a: 3 identical tokens", "  c != a: first difference at new token 1"]
    assert compare_tokens([a, b]) == (True, ["  b == a: 3 identical tokens"])


def test_hf_copy_of_our_model_gives_our_logits(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(bench_generate.CONFIGS, "tiny", TINY)
    cfg = bench_generate.build_config("tiny")
    model = GPTModel(cfg).eval()
    hf = bench_generate.hf_model_from_ours(model)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(tokens)[..., : cfg.vocab_size]  # the padding rows are not exported
        theirs = hf(tokens).logits
    assert cfg.padded_vocab_size > cfg.vocab_size and theirs.shape == (1, 12, cfg.vocab_size)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_tiny_run_decodes_the_same_tokens_on_every_contender(monkeypatch, capsys):
    monkeypatch.setitem(bench_generate.CONFIGS, "tiny", TINY)
    argv = ["--config", "tiny", "--prompt-tokens", "5", "--new-tokens", "20", "--rounds", "1"]
    assert bench_generate.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 layers, hidden 32, 4 heads, vocab 257 (padded 384)" in out
    assert "  ours (no cache) == ours (KV cache): 20 identical tokens" in out
    try:
        import transformers  # noqa: F401

        assert "  HF generate == ours (KV cache): 20 identical tokens" in out
    except ImportError:
        assert "HF generate: skipped (transformers is not installed" in out
    assert "MISMATCH" not in out
    assert "ours (KV cache) / ours (no cache): " in out
