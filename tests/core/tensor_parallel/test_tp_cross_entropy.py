"""Vocab-parallel cross entropy: equals F.cross_entropy on the full logits, values and gradients."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from megatron_lite.core.tensor_parallel import cross_entropy as ce_module
from megatron_lite.core.tensor_parallel import split_for_rank, vocab_parallel_cross_entropy

S, B, V = 5, 3, 10
LOGITS = torch.randn(S, B, V, generator=torch.Generator().manual_seed(0)) * 3
TARGET = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(1))
UPSTREAM = torch.rand(S, B, generator=torch.Generator().manual_seed(2))


def _reference(logits, target):
    logits = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [s, b]
    loss.backward(UPSTREAM)
    return loss.detach(), logits.grad


def _ours(logits, target, group=None, vocab_size=None):
    logits = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(logits, target, group, vocab_size)
    loss.backward(UPSTREAM)
    return loss.detach(), logits.grad


def _assert_matches(got, ref_loss, ref_grad, *, atol=1e-6, grad_atol=None):
    """got = (loss, grad) equals the reference within atol (the gradient within grad_atol when given)."""
    loss, grad = got
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=atol if grad_atol is None else grad_atol, rtol=0)


def _shard(full_grad, rank):
    """TP rank `rank` of 2's slice of a full-vocabulary gradient."""
    return split_for_rank(full_grad, 2, rank, 2)


def test_single_process_matches_torch():
    loss, grad = _ours(LOGITS, TARGET)
    assert loss.dtype == torch.float32 and loss.shape == (S, B)
    _assert_matches((loss, grad), *_reference(LOGITS, TARGET))


def test_padding_columns_are_excluded():
    padded = torch.cat([LOGITS, torch.full((S, B, 2), 50.0)], dim=-1)  # two huge padding logits
    loss, grad = _ours(padded, TARGET, vocab_size=V)
    _assert_matches((loss, grad[..., :V]), *_reference(LOGITS, TARGET))
    assert torch.count_nonzero(grad[..., V:]) == 0


def test_bf16_logits_give_fp32_loss_and_bf16_gradient():
    logits = LOGITS.bfloat16().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(logits, TARGET)
    loss.backward(UPSTREAM)
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref_loss, _ = _reference(LOGITS.bfloat16().float(), TARGET)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)


def test_out_of_range_target_is_finite_and_gets_no_onehot():
    """A pad id (-1, loss-masked later) must not index out of range, and leaves other tokens alone."""
    target = TARGET.clone()
    target[0, 0] = -1
    loss, grad = _ours(LOGITS, target)
    ref_loss, ref_grad = _reference(LOGITS, TARGET)
    assert torch.isfinite(loss[0, 0])
    torch.testing.assert_close(loss.flatten()[1:], ref_loss.flatten()[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(grad.flatten(0, 1)[1:], ref_grad.flatten(0, 1)[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        grad[0, 0], torch.softmax(LOGITS[0, 0], -1) * UPSTREAM[0, 0], atol=1e-6, rtol=0
    )


def _ce_worker(rank, world_size):
    group = dist.group.WORLD
    plain = _ours(split_for_rank(LOGITS, 2, rank, 2), TARGET, group)
    # 9 true columns padded to 10: rank 1's last column is padding and gets a huge logit.
    padded = split_for_rank(torch.cat([LOGITS[..., :9], torch.full((S, B, 1), 80.0)], -1), 2, rank, 2)
    target = TARGET.clamp(max=8)
    # 4 true columns padded to 10: rank 1's whole shard is padding.
    tiny = split_for_rank(LOGITS, 2, rank, 2)
    out = {
        "plain": plain,
        "padded": _ours(padded, target, group, vocab_size=9),
        "tiny": _ours(tiny, TARGET % 4, group, vocab_size=4),
    }
    out.update(_chunked_ce_worker(rank, world_size))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_ce_worker, 2)


def test_tensor_parallel_matches_full_vocab(results):
    ref_loss, ref_grad = _reference(LOGITS, TARGET)
    pad_loss, pad_grad = _reference(LOGITS[..., :9], TARGET.clamp(max=8))
    pad_grad = torch.cat([pad_grad, torch.zeros(S, B, 1)], dim=-1)
    for rank, got in enumerate(results):
        _assert_matches(got["plain"], ref_loss, _shard(ref_grad, rank))
        _assert_matches(got["padded"], pad_loss, _shard(pad_grad, rank))


def test_a_rank_holding_only_padding(results):
    ref_loss, ref_grad = _reference(LOGITS[..., :4], TARGET % 4)
    expected_grad = torch.cat([ref_grad, torch.zeros(S, B, 6)], dim=-1)
    for rank, got in enumerate(results):
        _assert_matches(got["tiny"], ref_loss, _shard(expected_grad, rank))


# ---- the chunked and in-place paths -------------------------------------------------------------------
# LOGITS has 15 rows of 10 columns; a chunk of 20 elements is 2 rows, so rows go in 8 chunks (the last
# one short), which exercises the chunk loop the way a 50k vocabulary does with real sizes.
SMALL_CHUNK = 20


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ce_module, "_CHUNK_ELEMENTS", SMALL_CHUNK)


def _run(logits, target, *, inplace, vocab_size=None, group=None):
    leaf = logits.clone().requires_grad_(True)
    scratch = leaf * 1  # a non-leaf the loss may overwrite, like the output layer's matmul result
    loss = vocab_parallel_cross_entropy(scratch, target, group, vocab_size, inplace=inplace)
    loss.backward(UPSTREAM)
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_fp32_matches_torch_in_value_and_gradient(small_chunks, inplace):
    _assert_matches(_run(LOGITS, TARGET, inplace=inplace), *_reference(LOGITS, TARGET))


@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_bf16_matches_fp32_math_on_the_bf16_values(small_chunks, inplace):
    """bf16 logits: the loss and gradient are the fp32 ones of the bf16 values, the gradient rounded once."""
    logits = LOGITS.bfloat16()
    loss, grad = _run(logits, TARGET, inplace=inplace)
    ref_loss, ref_grad = _reference(logits.float(), TARGET)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    _assert_matches((loss, grad), ref_loss, ref_grad.bfloat16(), atol=1e-5, grad_atol=0)


def test_chunked_padding_with_inplace_gives_zero_gradient_to_padding(small_chunks):
    padded = torch.cat([LOGITS, torch.full((S, B, 2), 50.0)], dim=-1)
    for logits in (padded, padded.bfloat16()):
        loss, grad = _run(logits, TARGET, inplace=True, vocab_size=V)
        ref_loss, ref_grad = _reference(logits[..., :V].float(), TARGET)
        _assert_matches((loss, grad[..., :V].float()), ref_loss, ref_grad, atol=1e-5, grad_atol=2e-3)
        assert torch.count_nonzero(grad[..., V:]) == 0


def test_inplace_reuses_the_logits_memory_and_leaves_non_inplace_input_untouched():
    for dtype in (torch.float32, torch.bfloat16):
        logits = LOGITS.to(dtype).clone().requires_grad_(True)
        scratch = logits * 1
        pointer = scratch.data_ptr()
        loss = vocab_parallel_cross_entropy(scratch, TARGET, inplace=True)
        grads = torch.autograd.grad(loss, scratch, UPSTREAM)
        assert grads[0].data_ptr() == pointer  # the gradient lives where the logits were

        kept = LOGITS.to(dtype).clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(kept, TARGET)
        loss.backward(UPSTREAM)
        assert torch.equal(kept.detach(), LOGITS.to(dtype))


def test_second_backward_through_the_consumed_softmax_is_an_error():
    logits = LOGITS.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(logits, TARGET)
    loss.backward(UPSTREAM, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward(UPSTREAM)


def _chunked_ce_worker(rank, world_size):
    # Runs inside _ce_worker's processes (one spawn for the module).
    ce_module._CHUNK_ELEMENTS = SMALL_CHUNK // 2  # shards have half the columns: keep 8 chunks
    group = dist.group.WORLD
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        shard = split_for_rank(LOGITS, 2, rank, 2).to(dtype)
        padded = split_for_rank(torch.cat([LOGITS[..., :9], torch.full((S, B, 1), 80.0)], -1), 2, rank, 2)
        out[name] = _run(shard, TARGET, inplace=True, group=group)
        out[name + "-padded"] = _run(
            padded.to(dtype), TARGET.clamp(max=8), inplace=True, vocab_size=9, group=group
        )
    return out


def test_chunked_tensor_parallel_matches_full_vocab(results):
    ref_loss, ref_grad = _reference(LOGITS, TARGET)
    pad_loss, pad_grad = _reference(LOGITS[..., :9], TARGET.clamp(max=8))
    pad_grad = torch.cat([pad_grad, torch.zeros(S, B, 1)], dim=-1)
    bf16_loss, bf16_grad = _reference(LOGITS.bfloat16().float(), TARGET)
    bf16_pad_loss, bf16_pad_grad = _reference(LOGITS[..., :9].bfloat16().float(), TARGET.clamp(max=8))
    bf16_pad_grad = torch.cat([bf16_pad_grad, torch.zeros(S, B, 1)], dim=-1)
    bf16 = dict(atol=1e-5, grad_atol=0)  # the bf16 gradient is exact: rounded once from the fp32 math
    for rank, got in enumerate(results):
        _assert_matches(got["fp32"], ref_loss, _shard(ref_grad, rank))
        _assert_matches(got["fp32-padded"], pad_loss, _shard(pad_grad, rank))
        assert got["bf16"][1].dtype == torch.bfloat16
        _assert_matches(got["bf16"], bf16_loss, _shard(bf16_grad, rank).bfloat16(), **bf16)
        _assert_matches(got["bf16-padded"], bf16_pad_loss, _shard(bf16_pad_grad, rank).bfloat16(), **bf16)
