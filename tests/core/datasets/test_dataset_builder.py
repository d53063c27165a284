"""build_train_valid_test_datasets: splits, blends, per-split paths and every user error."""

from types import SimpleNamespace

import numpy as np
import pytest

from megatron_lite.core.datasets.blended_dataset import BlendedDataset
from megatron_lite.core.datasets.builder import build_train_valid_test_datasets, parse_blend
from megatron_lite.core.datasets.gpt_dataset import GPTDataset
from megatron_lite.core.datasets.indexed_dataset_builder import IndexedDatasetBuilder
from megatron_lite.core.datasets.utils import parse_and_normalize_split, split_indices, split_matrix
from megatron_lite.errors import UserError

TOKENIZER = SimpleNamespace(name="ByteTokenizer", eod=256, vocab_size=257)


def make(prefix, n_docs, doc_len=20, top=100, dtype=np.uint16):
    tokens = np.arange(n_docs * doc_len) % top
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        b.add_documents(tokens.astype(dtype), np.full(n_docs, doc_len))
        b.finalize()
    return str(prefix)


def cfg(tmp_path, **kw):
    base = dict(
        data_path=None,
        split=None,
        train_data_path=None,
        valid_data_path=None,
        test_data_path=None,
        data_cache_path=str(tmp_path / "cache"),
        seq_length=16,
        seed=1234,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        padded_vocab_size=384,
        eval_iters=10,
        eval_interval=100,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_split_parsing():
    assert parse_and_normalize_split("949,50,1") == [0.949, 0.05, 0.001]
    assert parse_and_normalize_split("98, 2") == [0.98, 0.02, 0.0]
    assert parse_and_normalize_split("1") == [1.0, 0.0, 0.0]
    assert parse_and_normalize_split("3/1/0") == [0.75, 0.25, 0.0]
    matrix = split_matrix(parse_and_normalize_split("969, 30, 1"))
    assert matrix[0] == (0.0, 0.969) and matrix[2][1] == pytest.approx(1.0)
    assert split_matrix([0.5, 0.0, 0.5])[1] is None
    # 42 documents: round(0.969*42)=41, round(0.999*42)=42 -> test gets none.
    assert [len(split_indices(42, m)) for m in matrix] == [41, 1, 0]
    with pytest.raises(UserError, match="sum to zero"):
        parse_and_normalize_split("0,0,0")
    with pytest.raises(UserError, match="at most 3"):
        parse_and_normalize_split("1,1,1,1")


def test_parse_blend():
    assert parse_blend(["a", "b"], "--data-path") == [("a", None), ("b", None)]
    assert parse_blend(["0.3", "a", "0.7", "b"], "--data-path") == [("a", 0.3), ("b", 0.7)]
    with pytest.raises(UserError, match="'0.3' looks like a weight"):
        parse_blend(["0.3", "a", "b"], "--data-path")


def test_splits_partition_the_documents(tmp_path):
    prefix = make(tmp_path / "d", 1000)
    train, valid, test = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=[prefix], split="949,50,1"), TOKENIZER, (100, 20, 5)
    )
    assert all(isinstance(d, GPTDataset) for d in (train, valid, test))
    assert train.indices.tolist() == list(range(0, 949))
    assert valid.indices.tolist() == list(range(949, 999))
    assert test.indices.tolist() == [999]
    assert len(train) >= 100 and len(valid) >= 20 and len(test) >= 5
    assert [d.index_split for d in (train, valid, test)] == ["train", "valid", "test"]


def test_weight_zero_or_no_samples_gives_none(tmp_path):
    prefix = make(tmp_path / "d", 100)
    train, valid, test = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=[prefix], split="90,10,0"), TOKENIZER, (10, 5, 5)
    )
    assert train is not None and valid is not None and test is None
    train, valid, test = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=[prefix], split="90,10,0"), TOKENIZER, (10, 0, 0)
    )
    assert valid is None and test is None


def test_default_split_and_default_cache_dir(tmp_path):
    prefix = make(tmp_path / "d", 1000)
    train, valid, test = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=[prefix], data_cache_path=None), TOKENIZER, (10, 5, 5)
    )
    assert (len(train.indices), len(valid.indices), len(test.indices)) == (969, 30, 1)
    assert train.config.split == "969, 30, 1"
    assert (
        tmp_path
        / "cache"
        / "GPTDataset_indices"
        / f"{train.unique_description_hash}-GPTDataset-train-sample_index.npy"
    ).exists()


def test_blend_hits_weights_within_one_percent(tmp_path):
    a, b = make(tmp_path / "a", 200, top=50), make(tmp_path / "b", 200, top=50)
    samples = 5000
    train, _, _ = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=["0.3", a, "0.7", b], split="100,0,0", eval_iters=0),
        TOKENIZER,
        (samples, 0, 0),
    )
    assert isinstance(train, BlendedDataset) and len(train) == samples
    share = np.bincount(train.dataset_index, minlength=2) / samples
    assert abs(share[0] - 0.3) < 0.01 and abs(share[1] - 0.7) < 0.01
    # Components are built with the surplus: ceil(ceil(5000*w) * 1.005).
    assert [d.num_samples for d in train.datasets] == [1508, 3518]
    train[0]
    train[samples - 1]


def test_blend_of_prefixes_weights_by_size(tmp_path):
    a, b = make(tmp_path / "a", 100), make(tmp_path / "b", 300)
    train, _, _ = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=[a, b], split="1", eval_iters=0), TOKENIZER, (1000, 0, 0)
    )
    assert train.weights == [0.25, 0.75]


def test_per_split_paths(tmp_path):
    a, b, c = make(tmp_path / "a", 50), make(tmp_path / "b", 20), make(tmp_path / "c", 10)
    train, valid, test = build_train_valid_test_datasets(
        cfg(tmp_path, train_data_path=[a], valid_data_path=[b], test_data_path=[c]), TOKENIZER, (10, 5, 5)
    )
    assert len(train.indices) == 50 and len(valid.indices) == 20 and len(test.indices) == 10
    with pytest.raises(UserError, match="--split applies to --data-path only"):
        build_train_valid_test_datasets(
            cfg(tmp_path, train_data_path=[a], split="1,0,0"), TOKENIZER, (10, 0, 0)
        )
    with pytest.raises(UserError, match="cannot be combined"):
        build_train_valid_test_datasets(
            cfg(tmp_path, data_path=[a], train_data_path=[a]), TOKENIZER, (10, 0, 0)
        )
    with pytest.raises(UserError, match="there is no --valid-data-path"):
        build_train_valid_test_datasets(cfg(tmp_path, train_data_path=[a]), TOKENIZER, (10, 5, 0))


def test_split_without_documents_is_an_error(tmp_path):
    prefix = make(tmp_path / "d", 42)
    with pytest.raises(UserError) as err:
        build_train_valid_test_datasets(cfg(tmp_path, data_path=[prefix]), TOKENIZER, (10, 5, 5))
    message = str(err.value)
    assert "--split '969, 30, 1' gives the test split no documents" in message
    assert f"{prefix} has only 42 documents" in message and "--split" in message


def test_empty_validation_while_evaluating_is_an_error(tmp_path):
    prefix = make(tmp_path / "d", 100)
    with pytest.raises(
        UserError, match=r"evaluation is asked for \(--eval-iters 10\).*validation split weight 0"
    ):
        build_train_valid_test_datasets(
            cfg(tmp_path, data_path=[prefix], split="100,0,0"), TOKENIZER, (10, 5, 0)
        )


def test_token_ids_beyond_vocabulary(tmp_path):
    prefix = make(tmp_path / "d", 100, top=1000)
    with pytest.raises(UserError) as err:
        build_train_valid_test_datasets(cfg(tmp_path, data_path=[prefix], split="1"), TOKENIZER, (10, 0, 0))
    message = str(err.value)
    assert (
        f"{prefix}.bin: token id 999" in message
        and "vocabulary of 384" in message
        and "--tokenizer-type" in message
    )
    # int32 data with a large vocabulary is checked too, and passes.
    prefix = make(tmp_path / "e", 100, top=1000, dtype=np.int32)
    train, _, _ = build_train_valid_test_datasets(
        cfg(tmp_path, data_path=[prefix], split="1", padded_vocab_size=1024), TOKENIZER, (10, 0, 0)
    )
    assert train is not None


def test_missing_data(tmp_path):
    with pytest.raises(UserError, match=r"nope\.idx: not found"):
        build_train_valid_test_datasets(
            cfg(tmp_path, data_path=[str(tmp_path / "nope")]), TOKENIZER, (10, 5, 5)
        )
    with pytest.raises(UserError, match="no training data"):
        build_train_valid_test_datasets(cfg(tmp_path), TOKENIZER, (10, 5, 5))


def test_data_loader_flags_parse_and_reach_the_datasets(tmp_path):
    from megatron_lite.arguments import parse_config

    cfg_ = parse_config(["--no-mmap-bin-files", "--no-create-attention-mask-in-dataloader"])
    assert (cfg_.mmap_bin_files, cfg_.create_attention_mask_in_dataloader) == (False, False)
    defaults = parse_config([])
    assert (defaults.mmap_bin_files, defaults.create_attention_mask_in_dataloader) == (True, True)

    prefix = make(tmp_path / "a", 50)
    results = {}
    for mmap, mask in ((True, True), (False, False)):
        c = cfg(tmp_path, data_path=[prefix], split="1,0,0", mmap_bin_files=mmap)
        c.create_attention_mask_in_dataloader = mask
        train, _, _ = build_train_valid_test_datasets(c, TOKENIZER, (10, 0, 0))
        assert (train.dataset._bin is None) == (not mmap) and train.config.create_attention_mask == mask
        results[mmap] = [train[i] for i in range(len(train))]
    assert all("attention_mask" in s for s in results[True])
    assert not any("attention_mask" in s for s in results[False])
    for a, b in zip(results[True], results[False]):
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_training_batches_with_and_without_the_attention_mask(tmp_path):
    # What the training loop receives: Megatron's [b, 1, s, s] bool mask (True = masked = the future) by
    # default; no attention_mask key at all with --no-create-attention-mask-in-dataloader.
    import torch

    from megatron_lite.training.data_samplers import build_pretraining_data_loader

    prefix = make(tmp_path / "a", 50)
    batches = {}
    for mask in (True, False):
        c = cfg(tmp_path, data_path=[prefix], split="1,0,0", create_attention_mask_in_dataloader=mask)
        c.micro_batch_size, c.num_workers = 2, 0
        train, _, _ = build_train_valid_test_datasets(c, TOKENIZER, (10, 0, 0))
        batches[mask] = next(iter(build_pretraining_data_loader(train, 0, c)))
    on, off = batches[True], batches[False]
    assert set(on) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    assert set(off) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert on["attention_mask"].shape == (2, 1, 16, 16) and on["attention_mask"].dtype == torch.bool
    future = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
    assert all(torch.equal(m[0], future) for m in on["attention_mask"])
    assert all(torch.equal(on[k], off[k]) for k in off)


def test_reset_attention_mask_needs_the_mask(tmp_path):
    prefix = make(tmp_path / "a", 50)
    c = cfg(
        tmp_path, data_path=[prefix], reset_attention_mask=True, create_attention_mask_in_dataloader=False
    )
    with pytest.raises(UserError, match="--reset-attention-mask needs the attention mask that "):
        build_train_valid_test_datasets(c, TOKENIZER, (10, 0, 0))
