"""KV-cache decoding gives the same logits as running the whole sequence without a cache."""

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import LLAMA_STYLE, SWITCH_STYLES, batch, make_config

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.models.gpt.kv_cache import (
    choose_decode_linear,
    onednn_available,
    select_decode_linear,
)

STYLES = {"gpt2": {}, "llama": LLAMA_STYLE, **SWITCH_STYLES}


@pytest.mark.parametrize("style", STYLES)
def test_incremental_decoding_matches_full_forward(style):
    cfg = make_config(**STYLES[style])
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


# ---- the single-token decoding step (GPTModel._decode_step) and its matrix-vector product ----------------

DECODE_LINEARS = ["torch", "onednn"] if onednn_available() else ["torch"]


class StepSpy:
    """Counts the calls of model._decode_step, to prove which path a forward took."""

    def __init__(self, model: GPTModel) -> None:
        self.calls = 0
        original = model._decode_step

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        model._decode_step = spy


@pytest.mark.parametrize("decode_linear", DECODE_LINEARS)
@pytest.mark.parametrize("style", STYLES)
def test_single_token_steps_take_the_decode_step_and_match_the_full_forward(style, decode_linear):
    """The decode step covers every switch (q/k norms, 1p norms, interleaved and scaled RoPE, windows)."""
    cfg = make_config(init_method_std=0.2, **STYLES[style])
    model = GPTModel(cfg).eval()
    spy = StepSpy(model)
    tokens, _ = batch(cfg)
    with torch.inference_mode():
        expected = model(tokens)  # [b, s, V]
        cache = model.init_kv_cache(2, cfg.seq_length, decode_linear)
        prefill = model(tokens[:, :4], kv_cache=cache)
        assert spy.calls == 0  # several tokens: the general path
        steps = []
        for t in range(4, cfg.seq_length):  # odd steps pass their position explicitly
            positions = torch.full((2, 1), t) if t % 2 else None
            steps.append(model(tokens[:, t : t + 1], position_ids=positions, kv_cache=cache))
    assert cache.decode_linear.name == decode_linear
    assert spy.calls == cfg.seq_length - 4 and cache.length == cfg.seq_length
    got = torch.cat([prefill, *steps], dim=1)
    assert expected.abs().max() > 0.5  # logits large enough that 1e-5 is a tight bound
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_decode_step_is_skipped_when_it_does_not_apply():
    cfg = make_config(**LLAMA_STYLE)
    model = GPTModel(cfg)
    spy = StepSpy(model)
    tokens, _ = batch(cfg)
    mask = torch.zeros(2, 1, 1, 2, dtype=torch.bool)  # [b, 1, s, cached + s]
    cache = model.init_kv_cache(2, cfg.seq_length)
    with torch.no_grad():
        model.train()  # training mode (dropout): the general path
        model(tokens[:, :1], kv_cache=cache)
        model.eval()
        model(tokens[:, 1:2], attention_mask=mask, kv_cache=cache)  # an explicit mask
    model(tokens[:, 2:3], kv_cache=cache)  # gradients enabled
    assert spy.calls == 0 and cache.length == 3
    with torch.no_grad():
        model(tokens[:, 3:4], kv_cache=cache)
    assert spy.calls == 1


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_last_position_only_is_the_last_row_of_the_full_logits(style):
    cfg = make_config(**(LLAMA_STYLE if style == "llama" else {}))
    model = GPTModel(cfg).eval()
    tokens, labels = batch(cfg)
    with torch.inference_mode():
        full = model(tokens)  # [b, s, V]
        last = model(tokens, last_position_only=True)
        cache = model.init_kv_cache(2, cfg.seq_length)
        prefill = model(tokens[:, :7], kv_cache=cache)
        prefill_last = model(tokens[:, 7:12], kv_cache=cache, last_position_only=True)
    assert last.shape == (2, 1, cfg.padded_vocab_size)
    # The same row of the same computation; only the output layer's product has fewer rows, and BLAS
    # picks its kernel (so its summation order) by the row count: equal to float rounding, not bitwise.
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    assert (full[:, -1:] - full[:, -2:-1]).abs().max() > 0.1  # any other row is far outside that bound
    torch.testing.assert_close(prefill_last, full[:, 11:12], atol=1e-5, rtol=0)
    assert prefill.shape[1] == 7 and cache.length == 12
    with pytest.raises(ValueError, match="last_position_only gives logits: it takes no labels"):
        model(tokens, labels=labels, last_position_only=True)


def test_auto_decode_linear_is_onednn_only_at_fp32_level_error():
    chosen = choose_decode_linear(4.2e-7)
    assert (
        chosen.name == "onednn" and chosen.description == "decode linear: onednn (auto; rel. error 4.2e-07)"
    )
    x, w = torch.randn(1, 1, 32), torch.randn(48, 32)
    if onednn_available():
        torch.testing.assert_close(chosen.linear(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)
    rejected = choose_decode_linear(3e-3)  # bf16-level: what a "medium" fp32 precision may allow
    assert rejected.name == "torch" and rejected.linear is F.linear
    assert (
        rejected.description == "decode linear: torch (auto; onednn's rel. error 3.0e-03 is not fp32-level)"
    )


def test_decode_linear_policies():
    weight = torch.randn(48, 32)
    assert select_decode_linear(weight, "torch").linear is F.linear
    assert select_decode_linear(weight.bfloat16()).name == "torch"  # auto: fp32 only
    if torch.get_float32_matmul_precision() == "highest":  # oneDNN in strict fp32: always fp32-level
        assert select_decode_linear(weight).name == ("onednn" if onednn_available() else "torch")
    with pytest.raises(ValueError, match="decode linear 'mkl' is not one of auto, torch, onednn"):
        select_decode_linear(weight, "mkl")
    if onednn_available():
        x = torch.randn(1, 1, 32)
        onednn = select_decode_linear(weight, "onednn").linear
        torch.testing.assert_close(onednn(x, weight, None), F.linear(x, weight), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="the onednn decode linear needs fp32 weights on a CPU"):
            select_decode_linear(weight.double(), "onednn")
