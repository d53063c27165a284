"""generate(): KV cache vs full recompute, sampling filters, seeds, stopping, TP, streaming decode."""

import pytest
import torch
from dist_utils import run_distributed

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.models.gpt.kv_cache import onednn_available
from megatron_lite.errors import UserError
from megatron_lite.inference import IncrementalDecoder, filter_logits, generate, sample_next_token
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tokenizer import build_tokenizer

# A large init std spreads the random model's logits, so greedy choices are far from ties and the
# cached and uncached paths (equal up to float rounding) must pick the same tokens.
STYLES = {
    "gpt2": {},
    "rope_gqa": {
        "position_embedding_type": "rope",
        "group_query_attention": True,
        "num_query_groups": 2,
        "normalization": "RMSNorm",
        "swiglu": True,
        "untie_embeddings_and_output_weights": True,
        "add_bias_linear": False,
    },
    # Megatron's architecture switches together: the decoding step must compute what the full forward does.
    "rope_switches": {
        "position_embedding_type": "rope",
        "group_query_attention": True,
        "num_query_groups": 2,
        "normalization": "RMSNorm",
        "swiglu": True,
        "add_bias_linear": False,
        "qk_layernorm": True,
        "layernorm_zero_centered_gamma": True,
        "rotary_interleaved": True,
        "use_rope_scaling": True,
        "rotary_base": 1000000,
        "rotary_seq_len_interpolation_factor": 2,
        "window_size": "6,0",
    },
}


def make_cfg(style: str, tp: int = 1, window: int = 16) -> MegatronConfig:
    cfg = MegatronConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=window,
        max_position_embeddings=window,
        init_method_std=0.3,
        tensor_model_parallel_size=tp,
        micro_batch_size=1,
        train_iters=1,
        lr=1e-4,
        mock_data=True,
        seed=7,
        **STYLES[style],
    )
    return cfg.finalize(world_size=tp, vocab_size=257)


def make_model(style: str, window: int = 16) -> GPTModel:
    return GPTModel(make_cfg(style, window=window), ParallelState())


PROMPT = [72, 101, 108, 108, 111]
DECODE_LINEARS = ["torch", "onednn"] if onednn_available() else ["torch"]


class FeedRecorder:
    """Wraps model.forward to record how many tokens each call fed and whether a cache was passed."""

    def __init__(self, model: GPTModel) -> None:
        self.calls: list[tuple[int, bool]] = []
        original = model.forward

        def forward(tokens, *args, **kwargs):
            self.calls.append((tokens.shape[1], kwargs.get("kv_cache") is not None))
            return original(tokens, *args, **kwargs)

        model.forward = forward


@pytest.mark.parametrize("decode_linear", DECODE_LINEARS)
@pytest.mark.parametrize("style", sorted(STYLES))
def test_greedy_with_cache_equals_without_cache_past_the_window(style, decode_linear):
    model = make_model(style)
    recorder = FeedRecorder(model)
    cached = generate(model, PROMPT, 24, greedy=True, decode_linear=decode_linear)
    cached_calls = list(recorder.calls)
    recorder.calls.clear()
    uncached = generate(model, PROMPT, 24, greedy=True, use_kv_cache=False)
    assert cached == uncached
    assert len(cached) == 24 and len(set(cached)) > 3  # a real sequence, not one repeated token
    # Cache: prefill 5, then one token per step until the 16-position window is full (11 steps),
    # then a re-prefill of the slid 16-token window for each of the remaining 12 steps.
    assert cached_calls == [(5, True)] + [(1, True)] * 11 + [(16, True)] * 12
    # No cache: the whole context, cropped to the window, every step.
    assert recorder.calls == [(min(5 + i, 16), False) for i in range(24)]


@pytest.mark.parametrize("decode_linear", DECODE_LINEARS)
def test_cached_logits_match_full_forward(decode_linear):
    model = make_model("rope_gqa").eval()  # no dropout
    tokens = torch.tensor([PROMPT + [3, 200, 17]])
    with torch.inference_mode():
        full = model(tokens)  # [1, 8, V]
        cache = model.init_kv_cache(1, 16, decode_linear)
        first = model(tokens[:, :5], kv_cache=cache)
        rest = [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(5, 8)]
    stepped = torch.cat([first] + rest, dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def test_top_k_1_and_tiny_temperature_equal_greedy():
    model = make_model("gpt2")
    greedy = generate(model, PROMPT, 12, greedy=True)
    assert generate(model, PROMPT, 12, top_k=1, seed=1) == greedy
    assert generate(model, PROMPT, 12, temperature=1e-4, seed=2) == greedy


def test_seed_reproducibility():
    model = make_model("gpt2")
    first = generate(model, PROMPT, 20, seed=1234)
    assert generate(model, PROMPT, 20, seed=1234) == first
    assert generate(model, PROMPT, 20, seed=1234, use_kv_cache=False) == first
    assert generate(model, PROMPT, 20, seed=4321) != first
    assert generate(model, PROMPT, 20, seed=1234, top_k=5) != first  # the filter changes the draws


def test_eod_stops_and_is_not_emitted():
    model = make_model("gpt2")
    greedy = generate(model, PROMPT, 10, greedy=True)
    stop = next(i for i in range(2, 10) if greedy[i] not in greedy[:i])  # a token not drawn before
    seen = []
    out = generate(model, PROMPT, 10, greedy=True, eod=greedy[stop], on_token=seen.append)
    assert out == greedy[:stop] and seen == greedy[:stop]


def test_model_mode_is_restored_and_padding_never_sampled():
    model = make_model("gpt2")
    model.train()
    out = generate(model, PROMPT, 40, temperature=5.0, seed=0)  # hot: nearly uniform draws
    assert model.training
    assert max(out) < 257 and model.config.padded_vocab_size == 384
    assert len(out) == 40


def test_bf16_autocast_follows_fp32_greedy():
    model = make_model("gpt2")
    fp32 = generate(model, PROMPT, 6, greedy=True)
    assert generate(model, PROMPT, 6, greedy=True, autocast_dtype=torch.bfloat16) == fp32


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.10, 0.50, 0.05, 0.20, 0.15])  # ranked: 1 (.5), 3 (.2), 4 (.15), 0 (.1), 2 (.05)
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(filter_logits(logits, top_p=p)).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {1}  # the top token alone has 0.5 >= 0.3
    assert kept(0.6) == {1, 3}  # 0.5 < 0.6 <= 0.7
    assert kept(0.8) == {1, 3, 4}  # 0.7 < 0.8 <= 0.85
    assert kept(0.9) == {0, 1, 3, 4}  # 0.85 < 0.9 <= 0.95
    assert kept(0.99) == {0, 1, 2, 3, 4}
    assert kept(0.0) == kept(1.0) == {0, 1, 2, 3, 4}  # off
    # Kept logits are unchanged, so the renormalised probabilities keep their ratios.
    filtered = filter_logits(logits, top_p=0.8)
    assert torch.equal(filtered[[1, 3, 4]], logits[[1, 3, 4]])
    # top-k first, then top-p on what is left (HuggingFace's order).
    assert set(torch.isfinite(filter_logits(logits, top_k=2, top_p=0.9)).nonzero().flatten().tolist()) == {
        1,
        3,
    }
    assert set(torch.isfinite(filter_logits(logits, top_k=3)).nonzero().flatten().tolist()) == {1, 3, 4}


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([0.10, 0.50, 0.05, 0.20, 0.15]).log()
    generator = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, top_p=0.8, generator=generator) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    # Nucleus {1, 3, 4} renormalised: 0.5/0.85, 0.2/0.85, 0.15/0.85; the others never.
    expected = torch.tensor([0.0, 0.5 / 0.85, 0.0, 0.2 / 0.85, 0.15 / 0.85])
    torch.testing.assert_close(counts, expected, atol=0.03, rtol=0)
    assert counts[0] == 0 and counts[2] == 0
    assert sample_next_token(logits, greedy=True) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_ids": []}, "the prompt is empty"),
        ({"prompt_ids": [300]}, "prompt token 300 is outside the model's vocabulary of 257"),
        ({"temperature": 0.0}, "--temperature must be > 0, got 0.0; use --greedy"),
        ({"top_p": 1.5}, r"--top-p must be in \[0, 1\] \(0 = off\), got 1.5"),
        ({"top_k": -1}, r"--top-k must be >= 0 \(0 = off\), got -1"),
        ({"max_new_tokens": -2}, "--max-new-tokens must be >= 0, got -2"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    model = make_model("gpt2")
    args = {"prompt_ids": PROMPT, "max_new_tokens": 3, **kwargs}
    with pytest.raises(UserError, match=message):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)


def test_incremental_decoder_holds_back_partial_characters():
    tokenizer = build_tokenizer("ByteTokenizer")
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in "a€b😀".encode()]
    # "€" is 3 bytes and "😀" 4: nothing is printed until each character is complete.
    assert pieces == ["a", "", "", "€", "b", "", "", "", "😀"]
    assert decoder.flush() == ""
    # Invalid bytes: each one is final as soon as the next byte arrives; the last waits for flush.
    assert [decoder.push(t) for t in (0xFF, 0xFF, 0xFF)] == ["", "\ufffd", "\ufffd"]
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize("name", ["ByteTokenizer", "GPT2BPETokenizer"])
def test_incremental_decoder_output_equals_decoding_everything(name):
    tokenizer = build_tokenizer(name)
    generator = torch.Generator().manual_seed(0)
    text = "naïve café — 日本語 😀 ok"
    streams = [tokenizer.encode(text)]
    # Random ids: byte soup with invalid and truncated UTF-8 sequences anywhere.
    streams += [torch.randint(0, 256, (60,), generator=generator).tolist() for _ in range(30)]
    for ids in streams:
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        assert "".join(pieces) == tokenizer.decode(ids)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in streams[0]]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def _tp_generate(rank: int, world_size: int) -> tuple[list[int], list[int]]:
    from megatron_lite.parallel_state import initialize_parallel

    torch.set_num_threads(1)
    pstate = initialize_parallel(2, device="cpu")
    model = GPTModel(make_cfg("rope_gqa", tp=2), pstate)
    greedy = generate(model, PROMPT, 14, greedy=True)
    # Different seeds per rank: TP rank 0's draw must win on both ranks.
    sampled = generate(model, PROMPT, 14, seed=100 + rank)
    return greedy, sampled


def test_tensor_parallel_generation_matches_single_process():
    model = make_model("rope_gqa")
    reference = generate(model, PROMPT, 14, greedy=True)
    reference_sampled = generate(model, PROMPT, 14, seed=100)
    (greedy0, sampled0), (greedy1, sampled1) = run_distributed(_tp_generate, 2)
    assert greedy0 == greedy1 == reference
    assert sampled0 == sampled1 == reference_sampled
