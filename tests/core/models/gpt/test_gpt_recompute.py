"""Activation recompute: same gradients (dropout masks replayed), fewer bytes kept for backward."""

import pytest
import torch
from gpt_helpers import LLAMA_STYLE, batch, make_config, saved_bytes_for_backward

import megatron_lite.core.models.gpt.attention as attention_module
from megatron_lite.core.models.gpt import GPTModel

SHAPE = dict(num_layers=4, seq_length=64, attention_dropout=0.2, hidden_dropout=0.2)
MODES = {
    "selective": dict(recompute_activations=True),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "full-block-3": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
}


def _saved_bytes_and_grads(model, tokens, labels):
    """Activation bytes kept for backward (see saved_bytes_for_backward), then the gradients."""
    torch.manual_seed(99)  # the default generator drives hidden dropout: same masks in every run
    saved, loss = saved_bytes_for_backward(model, tokens, labels)
    loss.backward()
    return saved, {n: p.grad for n, p in model.named_parameters()}


def _run(style, **overrides):
    cfg = make_config(**SHAPE, **(LLAMA_STYLE if style == "llama" else {}), **overrides)
    tokens, labels = batch(cfg)
    return _saved_bytes_and_grads(GPTModel(cfg), tokens, labels)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def runs(request):
    return request.param, {
        "none": _run(request.param),
        **{m: _run(request.param, **o) for m, o in MODES.items()},
    }


@pytest.mark.parametrize("mode", MODES)
def test_recompute_gives_identical_gradients(runs, mode):
    _, results = runs
    expected = results["none"][1]
    for name, grad in results[mode][1].items():
        torch.testing.assert_close(grad, expected[name], atol=0, rtol=0, msg=name)


def test_recompute_keeps_fewer_bytes_for_backward(runs):
    _, results = runs
    saved = {mode: result[0] for mode, result in results.items()}
    b, a, s, layers = 2, 4, SHAPE["seq_length"], SHAPE["num_layers"]
    # Selective recompute drops at least the attention core's fp32 probabilities, the dropout mask
    # (bool) and the dropped probabilities (fp32): 9 bytes per [b, heads, s, s] element per layer.
    assert saved["none"] - saved["selective"] >= 9 * b * a * s * s * layers
    assert saved["full-uniform-2"] < saved["full-uniform-1"] < saved["selective"]
    assert saved["full-uniform-1"] < saved["full-block-3"] < saved["full-block-1"] < saved["none"]


def test_without_replaying_the_tracker_the_attention_dropout_masks_differ(monkeypatch):
    """The control: plain checkpoint() restores only the default generator, so the gradients change."""

    def plain_checkpoint(function, *args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    reference = _run("gpt2")[1]
    monkeypatch.setattr(attention_module, "checkpoint_with_rng_tracker", plain_checkpoint)
    broken = _run("gpt2", recompute_activations=True)[1]
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert (broken[name] - reference[name]).abs().max() > 1e-4
