"""Activation recompute: same loss and gradients (dropout masks replayed), fewer bytes kept for backward,
and the modules --recompute-modules names really run twice."""

import pytest
import torch
from gpt_helpers import LLAMA_STYLE, batch, make_config, saved_bytes_for_backward
from helpers import tiny_config

import megatron_lite.core.models.gpt.attention as attention_module
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.models.gpt.attention import DotProductAttention
from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.models.gpt.norms import LayerNorm, RMSNorm
from megatron_lite.errors import UserError

SHAPE = dict(num_layers=4, seq_length=64, attention_dropout=0.2, hidden_dropout=0.2)
SELECTIVE = dict(recompute_granularity="selective")
MODES = {
    "selective": dict(recompute_activations=True),
    "selective-mlp": dict(SELECTIVE, recompute_modules=["mlp"]),
    "selective-layernorm": dict(SELECTIVE, recompute_modules=["layernorm"]),
    "selective-all": dict(SELECTIVE, recompute_modules=["core_attn", "mlp", "layernorm"]),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "full-block-3": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
}


def _saved_bytes_and_grads(model, tokens, labels):
    """Activation bytes kept for backward (see saved_bytes_for_backward), the gradients, the loss."""
    torch.manual_seed(99)  # the default generator drives hidden dropout: same masks in every run
    saved, loss = saved_bytes_for_backward(model, tokens, labels)
    loss.backward()
    return saved, {n: p.grad for n, p in model.named_parameters()}, loss.detach()


# The llama style also carries per-head q/k norms and zero-centred norms, whose weights the layernorm
# recompute must handle like any other.
LLAMA_SWITCHES = dict(LLAMA_STYLE, qk_layernorm=True, layernorm_zero_centered_gamma=True)


def _run(style, **overrides):
    cfg = make_config(**SHAPE, **(LLAMA_SWITCHES if style == "llama" else {}), **overrides)
    tokens, labels = batch(cfg)
    return _saved_bytes_and_grads(GPTModel(cfg), tokens, labels)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def runs(request):
    return request.param, {
        "none": _run(request.param),
        **{m: _run(request.param, **o) for m, o in MODES.items()},
    }


@pytest.mark.parametrize("mode", MODES)
def test_recompute_gives_identical_loss_and_gradients(runs, mode):
    _, results = runs
    expected = results["none"][1]
    assert torch.equal(results[mode][2], results["none"][2])
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
    # layernorm: the outputs of both norms of every layer [s, b, h] fp32 are freed until backward.
    h = 32
    assert saved["none"] - saved["selective-layernorm"] >= 2 * layers * s * b * h * 4
    # mlp: at least fc1's output and the activation's [s, b, ffn] fp32 (ffn 4h, or 2 x ffn gated).
    assert saved["none"] - saved["selective-mlp"] >= 2 * layers * s * b * 64 * 4
    assert saved["selective-all"] < min(
        saved["selective"], saved["selective-mlp"], saved["selective-layernorm"]
    )


def _forward_calls(model) -> dict[type, int]:
    """Counts of forward calls per module class, for the classes selective recompute may rerun. A pre-hook:
    checkpoint's recomputation stops once it has what backward needs, before the forward hooks run."""
    calls: dict[type, int] = {}

    def count(module, args):
        calls[type(module)] = calls.get(type(module), 0) + 1

    for module in model.modules():
        if isinstance(module, (DotProductAttention, MLP, LayerNorm, RMSNorm)):
            module.register_forward_pre_hook(count)
    return calls


@pytest.mark.parametrize(
    "modules",
    [["core_attn"], ["mlp"], ["layernorm"], ["core_attn", "mlp", "layernorm"]],
    ids="-".join,
)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_listed_modules_run_again_in_backward_and_only_they(style, modules):
    norm = RMSNorm if style == "llama" else LayerNorm
    cfg = make_config(
        **SHAPE, **(LLAMA_SWITCHES if style == "llama" else {}), **SELECTIVE, recompute_modules=modules
    )
    model = GPTModel(cfg)
    calls = _forward_calls(model)
    tokens, labels = batch(cfg)
    loss = model(tokens, labels=labels).mean()
    layers = cfg.num_layers
    # Forward: attention and MLP once per layer; norms: two per layer, the final one, and (llama) q/k.
    norms = 2 * layers + 1 + (2 * layers if style == "llama" else 0)
    assert calls == {DotProductAttention: layers, MLP: layers, norm: norms}
    loss.backward()
    expected = {
        DotProductAttention: layers * (2 if "core_attn" in modules else 1),
        MLP: layers * (2 if "mlp" in modules else 1),
        norm: norms + (2 * layers if "layernorm" in modules else 0),  # the layer norms, not final or q/k
    }
    assert calls == expected


def test_recompute_modules_errors_name_the_flag():
    def error(**overrides):
        with pytest.raises(UserError) as err:
            tiny_config(recompute_granularity="selective", **overrides)
        return str(err.value)

    assert error(recompute_modules=["moe_act"]) == (
        "--recompute-modules moe_act: it recomputes part of mixture-of-experts layers, which megatron-lite's "
        "GPT does not have (it has core_attn, mlp, layernorm)"
    )
    assert error(recompute_modules=["attention"]) == (
        "--recompute-modules attention is not one of Megatron's submodules; megatron-lite recomputes "
        "core_attn, mlp, layernorm"
    )
    assert error(recompute_method="uniform") == (
        "--recompute-method uniform is for --recompute-granularity full; selective recompute picks its "
        "submodules with --recompute-modules"
    )
    # Without selective granularity the list is not used (as in Megatron).
    assert tiny_config(recompute_modules=["moe_act"]).recompute_modules == ["moe_act"]


def test_without_replaying_the_tracker_the_attention_dropout_masks_differ(monkeypatch):
    """The control: plain checkpoint() restores only the default generator, so the gradients change."""

    def plain_checkpoint(function, *args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    reference = _run("gpt2")[1]
    monkeypatch.setattr(attention_module, "checkpoint_with_rng_tracker", plain_checkpoint)
    broken = _run("gpt2", recompute_activations=True)[1]
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert (broken[name] - reference[name]).abs().max() > 1e-4


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_selective_recompute_under_bf16_autocast_gives_identical_loss_and_gradients(style):
    """Recomputation runs in backward, outside the forward's autocast region; the results must not change."""
    results = []
    for extra in ({}, dict(SELECTIVE, recompute_modules=["core_attn", "mlp", "layernorm"])):
        cfg = make_config(**(LLAMA_SWITCHES if style == "llama" else {}), **extra)
        model = GPTModel(cfg)
        tokens, labels = batch(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels=labels).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (recomputed_loss, recomputed_grads) = results
    assert torch.equal(loss, recomputed_loss)
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name
