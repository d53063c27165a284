"""KV-cache decoding gives the same logits as running the whole sequence without a cache."""

import pytest
import torch
from gpt_helpers import LLAMA_STYLE, batch, make_config

from megatron_lite.core.models.gpt import GPTModel


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_incremental_decoding_matches_full_forward(style):
    cfg = make_config(**(LLAMA_STYLE if style == "llama" else {}))
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg)
    with torch.no_grad():
        expected = model(tokens)  # [b, s, V]
        cache = model.init_kv_cache(batch_size=2, max_seq_len=cfg.seq_length)
        pieces = []
        for start, end in [(0, 5), (5, 6), (6, 9), *((t, t + 1) for t in range(9, cfg.seq_length))]:
            pieces.append(model(tokens[:, start:end], kv_cache=cache))
            assert cache.length == end
    assert [p.shape[1] for p in pieces[:3]] == [5, 1, 3]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=0)


def test_cache_gives_the_loss_of_the_new_tokens_and_can_be_reset():
    cfg = make_config(**LLAMA_STYLE)
    model = GPTModel(cfg).eval()
    tokens, labels = batch(cfg)
    with torch.no_grad():
        expected = model(tokens, labels=labels)
        cache = model.init_kv_cache(2, cfg.seq_length)
        first = model(tokens[:, :10], labels=labels[:, :10], kv_cache=cache)
        rest = model(tokens[:, 10:], labels=labels[:, 10:], kv_cache=cache)
        cache.reset()
        again = model(tokens[:, :10], labels=labels[:, :10], kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, atol=1e-5, rtol=0)
    assert torch.equal(again, first)


def test_cache_under_bf16_autocast_stores_bf16_and_tracks_the_uncached_logits():
    cfg = make_config(**LLAMA_STYLE)
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(tokens).float()
        cache = model.init_kv_cache(2, cfg.seq_length)
        prefill = model(tokens[:, :8], kv_cache=cache)
        steps = [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(8, cfg.seq_length)]
    assert cache.keys[0].dtype == torch.bfloat16
    got = torch.cat([prefill, *steps], dim=1).float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_cache_limits_are_clear_errors():
    cfg = make_config()
    model = GPTModel(cfg).eval()
    with pytest.raises(ValueError, match=r"max_seq_len 17 exceeds --max-position-embeddings 16"):
        model.init_kv_cache(1, 17)
    cache = model.init_kv_cache(1, 4)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        model(tokens, kv_cache=cache)
        with pytest.raises(ValueError, match=r"KV cache holds 4 positions; 3 cached \+ 3 new do not fit"):
            model(tokens, kv_cache=cache)
