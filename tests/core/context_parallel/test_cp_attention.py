"""Context-parallel attention on real gloo processes equals full causal attention on one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.core.context_parallel import context_parallel_attention, cp_positions, split_batch_for_cp
from megatron_lite.errors import UserError
from tests.dist_utils import run_distributed

B, HEADS, SEQ, D = 2, 4, 16, 8


def _inputs(groups: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, SEQ, D, generator=gen, dtype=dtype)
    k = torch.randn(B, groups, SEQ, D, generator=gen, dtype=dtype)
    v = torch.randn(B, groups, SEQ, D, generator=gen, dtype=dtype)
    grad = torch.randn(B, HEADS, SEQ, D, generator=gen, dtype=dtype)
    return q, k, v, grad


def _reference(groups: int, window_left: int | None):
    q, k, v, grad = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(groups)))
    pos = torch.arange(SEQ)
    keep = pos[None, :] <= pos[:, None]
    if window_left is not None:
        keep = keep & (pos[None, :] >= pos[:, None] - window_left)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=groups != HEADS)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _cp_rank(rank, world_size, groups, comm_type, window_left):
    q, k, v, grad = _inputs(groups)
    idx = cp_positions(SEQ, world_size, rank)
    local = [t[:, :, idx].clone().requires_grad_(i < 3) for i, t in enumerate((q, k, v, grad))]
    out = context_parallel_attention(*local[:3], dist.group.WORLD, comm_type, window_left)
    out.backward(local[3])
    return idx, out.detach(), local[0].grad, local[1].grad, local[2].grad


@pytest.mark.parametrize(
    ("world", "groups", "comm_type", "window_left"),
    [
        (2, 4, "p2p", None),
        (2, 2, "all_gather", None),
        (4, 2, "p2p", None),  # GQA, four ranks, 8 chunks of 2 positions
        (2, 1, "p2p", 5),  # MQA with a sliding window crossing chunk borders
    ],
)
def test_cp_attention_equals_full_attention(world, groups, comm_type, window_left):
    expected = _reference(groups, window_left)
    for idx, *got in run_distributed(_cp_rank, world, groups, comm_type, window_left):
        for name, value, full in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(value, full[:, :, idx], rtol=1e-10, atol=1e-10, msg=name)


def test_positions_are_megatrons_load_balanced_chunks():
    # seq 16, CP 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([cp_positions(24, 3, r) for r in range(3)]).sort().values
    assert every.tolist() == list(range(24))


def test_batch_split_keeps_global_positions_and_drops_the_mask():
    tokens = torch.arange(16).view(1, 16)
    batch = {"tokens": tokens, "labels": tokens + 100, "attention_mask": torch.ones(1, 1, 16, 16)}
    part = split_batch_for_cp(batch, 2, 1)
    assert part["tokens"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert part["labels"].tolist() == [[104, 105, 106, 107, 108, 109, 110, 111]]
    assert part["position_ids"].tolist() == part["tokens"].tolist()
    assert "attention_mask" not in part


def test_sequence_not_divisible_by_2c_is_one_line():
    with pytest.raises(UserError) as caught:
        split_batch_for_cp({"tokens": torch.zeros(1, 12, dtype=torch.long)}, 4, 0)
    assert str(caught.value) == (
        "--seq-length 12 is not divisible by 2 x --context-parallel-size 4 = 8: context parallelism splits "
        "each sequence into that many equal chunks"
    )


def _gradcheck_rank(rank, world_size, comm_type, p):
    # Small fp64 inputs: autograd's numerical check of the hand-written ring backward, dropout included.
    # One rank: with more, each rank's output depends on the others' inputs, which gradcheck cannot see.
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, 2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return context_parallel_attention(q, k, v, dist.group.WORLD, comm_type, None, p, 1234)

    ok = torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
    again = torch.equal(f(q, k, v), f(q, k, v))  # the same seed draws the same masks
    other = context_parallel_attention(q, k, v, dist.group.WORLD, comm_type, None, p, 99)
    return ok, again, not torch.equal(other, f(q, k, v))


@pytest.mark.parametrize("comm_type", ["p2p", "all_gather"])
def test_dropout_backward_passes_gradcheck_and_masks_follow_the_seed(comm_type):
    for ok, same_seed_same, other_seed_differs in run_distributed(_gradcheck_rank, 1, comm_type, 0.3):
        assert ok and same_seed_same and other_seed_differs
