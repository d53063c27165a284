"""Megatron's pretraining sampler (DP slices, exact resume), the data loader built on it, and mock data."""

import pytest
import torch

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.data_samplers import (
    MegatronPretrainingSampler,
    MockGPTDataset,
    build_mock_datasets,
    build_pretraining_data_loader,
)


def batches(total, consumed, mbs, rank, dp, drop_last=True):
    return list(MegatronPretrainingSampler(total, consumed, mbs, rank, dp, drop_last))


def test_dp2_slices_of_each_chunk():
    assert batches(16, 0, 2, 0, 2) == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert batches(16, 0, 2, 1, 2) == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert len(MegatronPretrainingSampler(16, 0, 2, 1, 2)) == 4


def test_resume_from_consumed_samples_continues_exactly():
    assert batches(16, 8, 2, 0, 2) == [[8, 9], [12, 13]]
    assert batches(16, 8, 2, 1, 2) == [[10, 11], [14, 15]]
    # Same for one rank with accumulation: consumed 6 of mbs 3 continues at sample 6.
    full = batches(30, 0, 3, 0, 1)
    assert batches(30, 6, 3, 0, 1) == full[2:]


def test_short_last_chunk_dropped_or_shared_out():
    assert batches(11, 0, 2, 0, 2) == [[0, 1], [4, 5]]
    assert batches(11, 0, 2, 0, 2, drop_last=False) == [[0, 1], [4, 5], [8, 9]]
    assert batches(11, 0, 2, 1, 2, drop_last=False) == [[2, 3], [6, 7], [10]]


def test_resuming_past_the_end_is_a_user_error():
    with pytest.raises(UserError, match=r"resuming at 20 consumed samples, but the dataset has only 16; "):
        MegatronPretrainingSampler(16, 20, 2, 0, 1)


def test_mock_dataset_is_deterministic_and_shifted():
    ds = MockGPTDataset(10, 6, 50, seed=1234, split="train")
    sample = ds[0]
    # Pinned: numpy's default_rng([seed, split, index]) stream; a change here changes every mock run.
    assert sample["tokens"].tolist() == [48, 48, 49, 19, 8, 46]
    assert sample["labels"].tolist() == [48, 49, 19, 8, 46, 5]
    assert sample["loss_mask"].dtype == torch.float32 and sample["loss_mask"].tolist() == [1.0] * 6
    assert sample["position_ids"].tolist() == list(range(6))
    assert torch.equal(MockGPTDataset(10, 6, 50, seed=1234)[3]["tokens"], ds[3]["tokens"])
    assert MockGPTDataset(10, 6, 50, seed=1234, split="valid")[0]["tokens"].tolist() == [8, 7, 40, 20, 47, 2]
    with pytest.raises(IndexError):
        ds[10]


def _cfg(extra=""):
    flags = (
        "--num-layers 1 --hidden-size 8 --num-attention-heads 2 --seq-length 6 --mock-data --vocab-size 50 "
        "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 3 " + extra
    )
    return parse_config(flags.split()).finalize(2)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_this_ranks_samples_from_consumed(workers):
    cfg = _cfg(f"--num-workers {workers}")
    train, valid, test = build_mock_datasets(cfg, (24, 0, 8))
    assert valid is None and len(train) == 24 and len(test) == 8
    pstate = ParallelState(rank=1, world_size=2, dp_rank=1, dp_size=2)
    loader = build_pretraining_data_loader(train, consumed_samples=8, cfg=cfg, pstate=pstate)
    got = [batch["tokens"] for batch in loader]
    # chunks of mbs*dp = 4 from sample 8: rank 1 takes [10, 11], [14, 15], [18, 19], [22, 23]
    expected = [torch.stack([train[i]["tokens"], train[i + 1]["tokens"]]) for i in (10, 14, 18, 22)]
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert build_pretraining_data_loader(None, 0, cfg, pstate) is None


def test_creating_a_loader_iterator_leaves_the_global_rng_alone():
    cfg = _cfg("--num-workers 0")
    train, _, _ = build_mock_datasets(cfg, (8, 0, 0))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    next(iter(build_pretraining_data_loader(train, 0, cfg, ParallelState())))
    assert torch.equal(torch.rand(3), expected)


def test_mock_dataset_applies_eod_masks():
    ds = MockGPTDataset(
        4, 12, 4, seed=3, eod=3, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True
    )
    sample = ds[0]
    tokens = sample["tokens"]
    assert (tokens == 3).any()  # a 4-token vocabulary makes eod common
    assert torch.equal(sample["loss_mask"], (tokens != 3).float())
    first_eod = int((tokens == 3).nonzero()[0])
    assert sample["position_ids"][first_eod + 1] == 0  # positions restart after an eod
    mask = sample["attention_mask"]
    assert mask.shape == (1, 12, 12) and mask.dtype == torch.bool
    assert mask[0, first_eod + 1, first_eod] and not mask[0, first_eod, first_eod]  # no attention across it
    plain = MockGPTDataset(4, 12, 4, seed=3, eod=3)[0]
    assert torch.equal(plain["tokens"], tokens) and "attention_mask" not in plain
    assert plain["loss_mask"].tolist() == [1.0] * 12
