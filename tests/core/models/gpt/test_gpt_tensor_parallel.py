"""GPTModel at TP=2 on 2 real gloo processes against TP=1: weights, logits, loss, gradients, dropout."""

import pytest
import torch
from dist_utils import run_distributed
from gpt_helpers import (
    LLAMA_STYLE,
    SWITCH_STYLES,
    batch,
    make_config,
    saved_bytes_for_backward,
    train_and_gather,
)

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.tensor_parallel import Dropout, gather_from_tensor_model_parallel_region
from megatron_lite.parallel_state import initialize_parallel

# The helper's vocabulary is 257 with make_vocab_size_divisible_by=1: 257 at TP=1, padded to 258 at TP=2.
CASES = {
    "gpt2": {},
    "gpt2-sequence-parallel": dict(sequence_parallel=True),
    "llama": LLAMA_STYLE,
    "llama-sequence-parallel": dict(LLAMA_STYLE, sequence_parallel=True),
    "llama-sp-full-recompute": dict(
        LLAMA_STYLE,
        sequence_parallel=True,
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    ),
    "gpt2-selective-recompute-padded-128": dict(recompute_activations=True, make_vocab_size_divisible_by=128),
    # Per-head q/k norms see only this rank's heads: their replicated weights need the TP gradient sum.
    "llama-switches": SWITCH_STYLES["llama-switches"],
    "gpt2-switches-sequence-parallel": dict(SWITCH_STYLES["gpt2-switches"], sequence_parallel=True),
    "llama-switches-sp-selective-all-modules": dict(
        SWITCH_STYLES["llama-switches"],
        sequence_parallel=True,
        recompute_granularity="selective",
        recompute_modules=["core_attn", "mlp", "layernorm"],
    ),
}
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _parity_worker(rank, world_size):
    pstate = initialize_parallel(2, device="cpu")
    results = {}
    for name, overrides in CASES.items():
        cfg = make_config(world_size=2, tensor_model_parallel_size=2, **overrides)
        results[name] = train_and_gather(GPTModel(cfg, pstate), cfg, pstate.tp_group)
        results[name]["padded_vocab_size"] = cfg.padded_vocab_size
    cfg = make_config(world_size=2, tensor_model_parallel_size=2, **LLAMA_STYLE)
    model = GPTModel(cfg, pstate).eval()
    tokens, _ = batch(cfg)
    with torch.no_grad():
        cache = model.init_kv_cache(2, cfg.seq_length)
        steps = [model(tokens[:, :6], kv_cache=cache)]
        steps += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(6, cfg.seq_length)]
        results["kv_cache_logits"] = gather_from_tensor_model_parallel_region(
            torch.cat(steps, 1), pstate.tp_group
        )
    results["dropout"] = _dropout_runs(pstate)
    for sequence_parallel in (False, True):
        cfg = make_config(world_size=2, tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
        model = GPTModel(cfg, pstate)
        tokens, labels = batch(cfg)
        results["saved_bytes", sequence_parallel], loss = saved_bytes_for_backward(model, tokens, labels)
        loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results["bf16", sequence_parallel] = train_and_gather(GPTModel(cfg, pstate), cfg, pstate.tp_group)
    return results


@pytest.fixture(scope="module")
def parity():
    """Everything the TP=2 tests need, from one pair of processes (spawning costs seconds)."""
    return run_distributed(_parity_worker, 2)


@pytest.mark.parametrize("case", CASES)
def test_tp2_equals_tp1(parity, case):
    cfg = make_config(**CASES[case])
    expected = train_and_gather(GPTModel(cfg), cfg, None)
    vocab = cfg.vocab_size
    for rank, got in enumerate(parity):
        got = got[case]
        assert got["padded_vocab_size"] == (512 if case.endswith("128") else 258)
        assert got["weights"].keys() == expected["weights"].keys()
        for name, weight in expected["weights"].items():
            tp2 = got["weights"][name]
            if name in VOCAB_ROWS:  # different padding at TP=1 and TP=2; the true rows are equal
                assert torch.count_nonzero(tp2[vocab:]) == 0
                assert torch.count_nonzero(got["grads"][name][vocab:]) == 0
                tp2, weight = tp2[:vocab], weight[:vocab]
            assert torch.equal(tp2, weight), (rank, name)
        for name, grad in expected["grads"].items():
            tp2 = got["grads"][name]
            if name in VOCAB_ROWS:
                tp2, grad = tp2[:vocab], grad[:vocab]
            torch.testing.assert_close(tp2, grad, atol=1e-5, rtol=0, msg=f"rank {rank} grad {name}")
        torch.testing.assert_close(got["loss"], expected["loss"], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            got["logits"][..., :vocab], expected["logits"][..., :vocab], atol=1e-5, rtol=0
        )


def test_kv_cache_decoding_at_tp2_matches_tp1_full_forward(parity):
    cfg = make_config(**LLAMA_STYLE)
    tokens, _ = batch(cfg)
    with torch.no_grad():
        expected = GPTModel(cfg).eval()(tokens)
    for got in parity:
        torch.testing.assert_close(got["kv_cache_logits"][..., : cfg.vocab_size], expected, atol=1e-5, rtol=0)


def test_sequence_parallel_keeps_fewer_activation_bytes(parity):
    cfg = make_config()
    s, b, h, layers = cfg.seq_length, 2, cfg.hidden_size, cfg.num_layers
    # Each of the 2L+1 norms keeps its input [s, b, h], its mean and rstd [s, b, 1], and its output is kept
    # by the next column-parallel linear: with SP all of them cover half the sequence (fp32: 4 bytes).
    norm_bytes = (2 * s * b * h + 2 * s * b) * 4
    for got in parity:
        saved, saved_sp = got["saved_bytes", False], got["saved_bytes", True]
        assert saved - saved_sp >= (2 * layers + 1) * norm_bytes // 2


def test_bf16_autocast_tp2_with_and_without_sequence_parallel_tracks_tp1(parity):
    cfg = make_config()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = train_and_gather(GPTModel(cfg), cfg, None)
    for got in parity:
        for sequence_parallel in (False, True):
            run = got["bf16", sequence_parallel]
            assert all(g.dtype == torch.float32 for g in run["grads"].values())
            torch.testing.assert_close(run["loss"], expected["loss"], atol=2e-2, rtol=0)
            qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
            scale = expected["grads"][qkv].abs().max()
            assert (run["grads"][qkv] - expected["grads"][qkv]).abs().max() < 0.05 * scale


def _dropout_masks(model):
    """Per Dropout module, the bool masks of dropped elements (among nonzero inputs), in call order."""
    masks = {}

    def hook(name):
        def record(module, inputs, output):
            masks.setdefault(name, []).append((output == 0) & (inputs[0] != 0))

        return record

    for name, module in model.named_modules():
        if isinstance(module, Dropout):
            module.register_forward_hook(hook(name))
    return masks


def _dropout_runs(pstate):
    results = {}
    for sequence_parallel in (False, True):
        cfg = make_config(
            world_size=2,
            tensor_model_parallel_size=2,
            attention_dropout=0.3,
            hidden_dropout=0.3,
            sequence_parallel=sequence_parallel,
        )
        tokens, labels = batch(cfg)
        losses = []
        for _ in range(2):
            model = GPTModel(cfg, pstate).train()
            masks = _dropout_masks(model)
            torch.manual_seed(cfg.seed)  # what training does once per run: same default stream on all ranks
            losses.append(model(tokens, labels=labels).detach())
        results[sequence_parallel] = {"losses": losses, "masks": masks}
    return results


@pytest.fixture(scope="module")
def dropout(parity):
    return [rank["dropout"] for rank in parity]


def test_dropout_is_deterministic_for_a_seed(dropout):
    for sequence_parallel in (False, True):
        runs = [rank[sequence_parallel]["losses"] for rank in dropout]
        assert torch.equal(runs[0][0], runs[0][1]) and torch.equal(runs[1][0], runs[1][1])
        assert torch.equal(runs[0][0], runs[1][0])  # both ranks compute the same (replicated) loss
    no_dropout = GPTModel(make_config()).train()
    tokens, labels = batch(make_config())
    assert not torch.equal(no_dropout(tokens, labels=labels), runs[0][0])


def test_attention_dropout_differs_across_tp_ranks_and_hidden_dropout_matches(dropout):
    rank0, rank1 = (rank[False]["masks"] for rank in dropout)
    attention = [n for n in rank0 if n.endswith("core_attention.attention_dropout")]
    hidden = [n for n in rank0 if n.endswith("hidden_dropout") or n.endswith("embedding_dropout")]
    assert len(attention) == 2 and len(hidden) == 3
    for name in attention:
        (m0,), (m1,) = rank0[name], rank1[name]
        assert m0.shape == (2, 2, 16, 16)  # [b, heads per rank, s, s]
        assert 0.2 < m0.float().sum() / (m0.numel() * 17 / 32) < 0.4  # ~30% of the causal entries
        assert not torch.equal(m0, m1), name
    for name in hidden:
        for m0, m1 in zip(rank0[name], rank1[name]):
            assert 0.2 < m0.float().mean() < 0.4
            assert torch.equal(m0, m1), name


def test_sequence_parallel_hidden_dropout_differs_across_shards(dropout):
    rank0, rank1 = (rank[True]["masks"] for rank in dropout)
    for name in ("embedding.embedding_dropout", "decoder.layers.0.hidden_dropout"):
        for m0, m1 in zip(rank0[name], rank1[name]):
            assert m0.shape == (8, 2, 32)  # [s/tp, b, h]
            assert not torch.equal(m0, m1), name
