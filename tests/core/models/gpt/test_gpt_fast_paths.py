"""The model's performance paths keep the numbers: contiguous residual stream, in-place loss, lean attention."""

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import LLAMA_STYLE, batch, make_config

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.models.gpt.attention import DotProductAttention
from megatron_lite.core.tensor_parallel import seed_model_parallel_rng


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def test_residual_stream_reaches_every_norm_contiguous():
    """A transposed [b, s, h] view as the residual stream made every norm copy its input, twice a layer."""
    model = GPTModel(make_config(num_layers=3))
    seen = []
    for layer in model.decoder.layers:
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    model.decoder.final_layernorm.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous())
    )
    tokens, labels = batch(make_config())
    model(tokens, labels=labels)
    assert seen == [True] * 7


def test_embedding_output_is_the_sum_of_word_and_position_rows_in_s_b_h_order():
    cfg = make_config()
    model = GPTModel(cfg)
    tokens, _ = batch(cfg)
    positions = torch.arange(cfg.seq_length).expand_as(tokens)
    out = model.embedding(tokens, positions)  # [s, b, h]
    words = model.embedding.word_embeddings.weight[tokens]  # [b, s, h]
    expected = (words + model.embedding.position_embeddings.weight[positions]).transpose(0, 1)
    assert out.is_contiguous() and out.shape == (cfg.seq_length, 2, cfg.hidden_size)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_in_place_loss_gives_the_gradients_of_cross_entropy_on_the_logits(bf16, style):
    """The labels path (loss reusing the logits' memory) against F.cross_entropy on the returned logits."""
    cfg = make_config(vocab_size=301, **(LLAMA_STYLE if style == "llama" else {}))  # padded vocabulary
    tokens, labels = batch(cfg)
    upstream = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for use_labels in (True, False):
        model = GPTModel(cfg)
        with _autocast(bf16):
            if use_labels:
                loss = model(tokens, labels=labels)
            else:
                logits = model(tokens)[..., : cfg.vocab_size]
                loss = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        loss.backward(upstream)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    # bf16: the logits' gradient is the same; the bf16 matmul that turns it into the output weight's
    # gradient rounds differently for its two memory layouts (one bf16 ulp of an entry, ~3e-5 of the max).
    tol = dict(atol=1e-3, rtol=1e-2) if bf16 else dict(atol=1e-6, rtol=1e-4)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **tol, msg=name)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_explicit_attention_path_equals_sdpa_when_nothing_is_dropped(bf16):
    """The dropout path's in-place scale/mask and fp32 softmax compute the same attention as SDPA."""
    seed_model_parallel_rng(1234)
    attn = DotProductAttention(0.0, num_heads=4, num_groups=2, head_dim=8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, n, 8, generator=gen).requires_grad_() for n in (4, 2, 2))
    outs = []
    for explicit in (True, False):
        with _autocast(bf16):
            if explicit:
                perm = [t.permute(1, 2, 0, 3) for t in (q, k, v)]  # [b, heads, s, d]
                out = attn._explicit_attention(*perm, None).permute(2, 0, 1, 3).reshape(9, 2, 32)
            else:
                out = attn(q, k, v)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        outs.append((out.float(), grads))
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    for got, ref in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(got, ref, **tol)
