"""The blocked causal attention kernel against float64 attention: outputs and gradients, causal, window, GQA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.core.models.gpt.attention import DotProductAttention
from megatron_lite.core.models.gpt.attention_kernels import blocked_causal_attention

# (heads, groups, window, seq, block): a sequence that is no multiple of the block, GQA with 3 heads a
# group, and windows shorter and longer than a block.
CASES = [
    (4, 4, None, 70, 16),
    (6, 2, None, 45, 32),
    (4, 4, 9, 70, 16),
    (6, 3, 40, 50, 16),
    (2, 1, 0, 33, 8),
]


def _inputs(heads: int, groups: int, seq: int, dtype: torch.dtype, head_dim: int = 16):
    generator = torch.Generator().manual_seed(heads * 100 + seq)
    q = torch.randn(2, heads, seq, head_dim, generator=generator)
    k = torch.randn(2, groups, seq, head_dim, generator=generator)
    v = torch.randn(2, groups, seq, head_dim, generator=generator)
    grad = torch.randn(2, heads, seq, head_dim, generator=generator)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], grad.to(dtype)


def _keep(seq: int, window: int | None) -> torch.Tensor:
    positions = torch.arange(seq)
    keep = positions[None, :] <= positions[:, None]
    if window is not None:
        keep &= positions[None, :] >= positions[:, None] - window
    return keep


def _math_attention(q, k, v, window: int | None) -> torch.Tensor:
    """The explicit path: scores, masked softmax in the inputs' dtype's matmuls, fp32 softmax."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~_keep(q.shape[2], window), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _run(fn, inputs, grad):
    out = fn(*inputs)
    out.backward(grad)
    grads = [t.grad.detach().clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return [out.detach(), *grads]


def _relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("heads,groups,window,seq,block", CASES)
def test_fp32_matches_float64_attention(heads, groups, window, seq, block):
    inputs, grad = _inputs(heads, groups, seq, torch.float32)
    scale = 1.0 / math.sqrt(inputs[0].shape[-1])
    ours = _run(lambda q, k, v: blocked_causal_attention(q, k, v, scale, window, block), inputs, grad)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact = _run(lambda q, k, v: _math_attention(q, k, v, window), exact_inputs, grad.double())
    for name, mine, reference in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert mine.dtype == torch.float32
        assert float((mine.double() - reference).abs().max()) < 1e-5, name


@pytest.mark.parametrize("heads,groups,window,seq,block", CASES[:4])
def test_bf16_is_as_close_to_float64_as_the_bf16_math_path(heads, groups, window, seq, block):
    """bf16 inputs, fp32 softmax statistics: the error against float64 is bf16's, and no larger than the
    error of the explicit bf16 path (scores, fp32 softmax, bf16 probabilities) that dropout runs."""
    inputs, grad = _inputs(heads, groups, seq, torch.bfloat16)
    scale = 1.0 / math.sqrt(inputs[0].shape[-1])
    ours = _run(lambda q, k, v: blocked_causal_attention(q, k, v, scale, window, block), inputs, grad)
    math_path = _run(lambda q, k, v: _math_attention(q, k, v, window), inputs, grad)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact = _run(lambda q, k, v: _math_attention(q, k, v, window), exact_inputs, grad.double())
    for name, mine, theirs, reference in zip(("out", "dq", "dk", "dv"), ours, math_path, exact):
        assert mine.dtype == torch.bfloat16
        assert _relative(mine, reference) < 2e-2, name
        assert _relative(mine, reference) <= 1.5 * _relative(theirs, reference) + 2e-3, name


def test_fully_masked_blocks_do_not_change_the_result():
    """Block sizes from 1 to beyond the sequence give the same attention (up to fp32 rounding)."""
    inputs, grad = _inputs(4, 2, 40, torch.float32)
    results = [
        _run(lambda q, k, v, n=n: blocked_causal_attention(q, k, v, 0.25, None, n), inputs, grad)
        for n in (1, 7, 40, 64)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window,groups", [(None, 4), (5, 2)])
def test_dot_product_attention_takes_the_kernel_while_compiling(monkeypatch, window, groups):
    """Under torch.compile on a CPU DotProductAttention runs the blocked kernel for bf16 (traced as if
    compiling here, so the test needs no compiler): its eager SDPA path's output and gradients within
    bf16 rounding; fp32 stays on SDPA."""
    core = DotProductAttention(0.0, 4, groups, 16, window_left=window)
    (q, k, v), grad = _inputs(4, groups, 30, torch.bfloat16)
    as_sbhd = [t.detach().permute(2, 0, 1, 3).contiguous().requires_grad_() for t in (q, k, v)]
    grad_sbhd = grad.permute(2, 0, 1, 3).reshape(30, 2, 64)
    eager = _run(core, as_sbhd, grad_sbhd)
    calls = []
    import megatron_lite.core.models.gpt.attention as attention_module

    def counted(*args, **kwargs):
        calls.append(args[4])
        return blocked_causal_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "blocked_causal_attention", counted)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    blocked = _run(core, as_sbhd, grad_sbhd)
    assert calls == [window]
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, blocked):
        assert _relative(b, a.double()) < 2e-2, name
    # A document mask, a KV cache (fewer queries than keys) or fp32 stay on SDPA.
    mask = torch.zeros(2, 1, 30, 30, dtype=torch.bool)
    with torch.no_grad():
        core(*as_sbhd, attention_mask=mask)
        core(as_sbhd[0][-3:], as_sbhd[1], as_sbhd[2])
        core(*[t.float() for t in as_sbhd])
    assert calls == [window]


def test_sdpa_reference_agrees_with_the_math_reference():
    """The float64 reference of these tests is the attention SDPA computes (guards the test's own mask)."""
    (q, k, v), _ = _inputs(4, 4, 20, torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_keep(20, 6))
    torch.testing.assert_close(_math_attention(q, k, v, 6), expected)


@pytest.mark.slow
def test_compiled_bf16_attention_matches_eager():
    """The real thing: torch.compile (inductor on the CPU) of DotProductAttention in bf16 runs the blocked
    kernel, and gives eager SDPA's output and gradients within bf16 rounding."""
    core = DotProductAttention(0.0, 4, 2, 16)
    (q, k, v), grad = _inputs(4, 2, 64, torch.bfloat16)
    as_sbhd = [t.detach().permute(2, 0, 1, 3).contiguous().requires_grad_() for t in (q, k, v)]
    grad_sbhd = grad.permute(2, 0, 1, 3).reshape(64, 2, 64)
    eager = _run(core, as_sbhd, grad_sbhd)
    compiled = _run(torch.compile(core), as_sbhd, grad_sbhd)
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled):
        assert _relative(b, a.double()) < 2e-2, name
