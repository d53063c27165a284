"""GPTDataset: Megatron's sample layout, epochs, seeds, the index cache, and the three mask options."""

import os
import time

import numpy as np
import pytest
import torch

from megatron_lite.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    build_gpt_indices,
    build_sample_index,
    get_ltor_masks_and_position_ids,
)
from megatron_lite.core.datasets.indexed_dataset import IndexedDataset
from megatron_lite.core.datasets.indexed_dataset_builder import IndexedDatasetBuilder

EOD = 99


def make_dataset(prefix, lengths, seed=0, vocab=50):
    """Documents of the given lengths with random ids below `vocab`, each ending in EOD when non-empty."""
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        doc = rng.integers(0, vocab, size=n).astype(np.uint16)
        if n:
            doc[-1] = EOD
        docs.append(doc)
    with IndexedDatasetBuilder(str(prefix), np.uint16) as builder:
        builder.add_documents(np.concatenate(docs), np.array(lengths))
        builder.finalize()
    return IndexedDataset(str(prefix)), docs


def config(tmp_path, seq=8, seed=1234, **kw):
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq,
        tokenizer_name="test",
        eod=EOD,
        split="1,0,0",
        split_matrix=[[0.0, 1.0], None, None],
        data_cache_path=str(tmp_path / "cache"),
        **kw,
    )


def reference_sample_index(sizes, document_index, seq, total_tokens):
    """Megatron's build_sample_idx loop, written from its description, for comparison."""
    rows = [(0, 0)]
    d, offset = 0, 0
    for _ in range((total_tokens - 1) // seq):
        remaining = seq + 1
        while remaining != 0:
            length = int(sizes[document_index[d]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                d += 1
                offset = 0
        rows.append((d, offset))
    return np.array(rows)


@pytest.mark.parametrize("seq", [1, 3, 8, 50])
def test_sample_index_matches_reference_loop(seq):
    rng = np.random.default_rng(seq)
    sizes = rng.integers(0, 20, size=200).astype(np.int32)
    sizes[[0, 5, 6, 7]] = 0  # empty documents, also in a row
    document_index = rng.permutation(np.tile(np.arange(200, dtype=np.int32), 3))
    total = int(sizes.sum()) * 3
    ours = build_sample_index(sizes, document_index, seq, total)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, reference_sample_index(sizes, document_index, seq, total))


def test_indices_numbers_and_separate_final_epoch():
    sizes = np.full(10, 11, dtype=np.int32)  # 110 tokens per epoch
    # 25 samples of 8 need 201 tokens: 2 epochs; 13 samples come from the first, so the last epoch
    # gives 12 of its 13 -> not separated.
    out = build_gpt_indices(sizes, np.arange(10), 25, 8, seed=3)
    assert len(out["document_index"]) == 20 and len(out["shuffle_index"]) == (220 - 1) // 8
    assert out["shuffle_index"].dtype == np.uint32 and out["document_index"].dtype == np.int32
    # 14 samples need 113 tokens: 2 epochs, the last gives 1 of 13 samples -> a separate final epoch.
    out = build_gpt_indices(sizes, np.arange(10), 14, 8, seed=3)
    doc, shuffle = out["document_index"], out["shuffle_index"]
    assert sorted(doc[:10]) == list(range(10)) and sorted(doc[10:]) == list(range(10))
    first = (110 - 1) // 8  # samples before the final epoch
    assert sorted(shuffle[:first]) == list(range(first)) and sorted(shuffle[first:]) == list(range(first, 27))
    # The same with numpy's RandomState directly: the document shuffles come first, then the samples.
    rng = np.random.RandomState(3)
    a = np.arange(10, dtype=np.int32)
    rng.shuffle(a)
    b = np.arange(10, dtype=np.int32)
    rng.shuffle(b)
    np.testing.assert_array_equal(doc, np.concatenate([a, b]))
    c = np.arange(first, dtype=np.uint32)
    rng.shuffle(c)
    np.testing.assert_array_equal(shuffle[:first], c)


def test_one_epoch_yields_every_token_once(tmp_path):
    ds, docs = make_dataset(
        tmp_path / "d", [int(n) for n in np.random.default_rng(1).integers(1, 40, size=60)]
    )
    indices = np.arange(10, 50, dtype=np.int32)  # a "train split" in the middle
    gpt = GPTDataset(ds, str(tmp_path / "d"), indices, None, "train", config(tmp_path, seq=16))
    assert gpt.num_epochs == 1
    counts = np.zeros(100, dtype=np.int64)
    for i in range(len(gpt)):
        sample = gpt[i]
        assert sample["tokens"].shape == (16,) and sample["tokens"].dtype == torch.int64
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        counts += np.bincount(sample["tokens"].numpy(), minlength=100)
    # The tokens after the last sample's start + seq are the tail no sample feeds as input.
    d, offset = (int(x) for x in gpt.sample_index[-1])
    tail = [ds.get(int(gpt.document_index[d]), offset)] + [
        ds.get(int(j)) for j in gpt.document_index[d + 1 :]
    ]
    counts += np.bincount(np.concatenate(tail).astype(np.int64), minlength=100)
    expected = np.bincount(np.concatenate([docs[j] for j in indices]).astype(np.int64), minlength=100)
    np.testing.assert_array_equal(counts, expected)
    # Samples are consecutive windows of the shuffled concatenation, overlapping by one token.
    stream = np.concatenate([docs[j] for j in gpt.document_index]).astype(np.int64)
    for i in range(len(gpt)):
        j = int(gpt.shuffle_index[i])
        np.testing.assert_array_equal(gpt.get_text(i), stream[j * 16 : j * 16 + 17])


def test_more_samples_than_an_epoch(tmp_path):
    ds, docs = make_dataset(tmp_path / "d", [10] * 12)
    gpt = GPTDataset(ds, str(tmp_path / "d"), np.arange(12), 40, "train", config(tmp_path, seq=8))
    assert gpt.num_epochs == 3 and len(gpt) == (360 - 1) // 8 >= 40
    assert np.bincount(gpt.document_index).tolist() == [3] * 12


def test_same_seed_same_samples_other_seed_differs(tmp_path):
    ds, _ = make_dataset(tmp_path / "d", [30] * 50)
    a = GPTDataset(ds, str(tmp_path / "d"), np.arange(50), 100, "train", config(tmp_path, seed=7))
    b = GPTDataset(ds, str(tmp_path / "d"), np.arange(50), 100, "train", config(tmp_path / "other", seed=7))
    c = GPTDataset(ds, str(tmp_path / "d"), np.arange(50), 100, "train", config(tmp_path, seed=8))
    assert b.cache.built  # built afresh in its own cache directory, same result
    same = [torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(100)]
    differ = [torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(100)]
    assert all(same) and not all(differ)


def test_cache_reused_and_invalidated(tmp_path):
    prefix = str(tmp_path / "d")
    ds, _ = make_dataset(prefix, [30] * 50)
    cfg = config(tmp_path)
    first = GPTDataset(ds, prefix, np.arange(50), 100, "train", cfg)
    assert first.cache.built
    names = sorted(os.listdir(tmp_path / "cache"))
    assert names == sorted(
        f"{first.unique_description_hash}-GPTDataset-train-{n}"
        for n in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")
    )
    again = GPTDataset(ds, prefix, np.arange(50), 100, "train", cfg)
    assert not again.cache.built and again.unique_description_hash == first.unique_description_hash
    assert isinstance(again.sample_index, np.memmap)
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    for other in (
        GPTDataset(ds, prefix, np.arange(50), 101, "train", cfg),
        GPTDataset(ds, prefix, np.arange(50), 100, "train", config(tmp_path, seq=9)),
        GPTDataset(ds, prefix, np.arange(50), 100, "valid", cfg),
        GPTDataset(ds, prefix, np.arange(49), 100, "train", config(tmp_path, seed=1)),
    ):
        assert other.cache.built and other.unique_description_hash != first.unique_description_hash
    # Rewrite the dataset: same name and settings, new contents -> a new key, never the stale index.
    time.sleep(0.01)
    ds2, _ = make_dataset(prefix, [31] * 50, seed=5)
    rebuilt = GPTDataset(ds2, prefix, np.arange(50), 100, "train", cfg)
    assert rebuilt.cache.built and rebuilt.unique_description_hash != first.unique_description_hash
    assert (
        '"tokenizer": "test"'
        in (
            tmp_path / "cache" / f"{first.unique_description_hash}-GPTDataset-train-description.txt"
        ).read_text()
    )


def test_build_once_protocol(tmp_path):
    prefix = str(tmp_path / "d")
    ds, _ = make_dataset(prefix, [30] * 20)
    calls = []
    builder = GPTDataset(
        ds, prefix, np.arange(20), 30, "train", config(tmp_path), barrier=lambda: calls.append("b")
    )
    follower = GPTDataset(
        ds,
        prefix,
        np.arange(20),
        30,
        "train",
        config(tmp_path),
        is_builder=False,
        barrier=lambda: calls.append("f"),
    )
    assert calls == ["b", "f"] and builder.cache.built and not follower.cache.built
    # A follower whose cache directory holds nothing (node-local disk) builds the same indices itself.
    lonely = GPTDataset(
        ds,
        prefix,
        np.arange(20),
        30,
        "train",
        config(tmp_path / "elsewhere"),
        is_builder=False,
        barrier=lambda: None,
    )
    assert lonely.cache.built
    np.testing.assert_array_equal(lonely.sample_index, builder.sample_index)


def test_plain_sample_carries_the_causal_mask_unless_turned_off(tmp_path):
    ds, _ = make_dataset(tmp_path / "d", [30] * 5)
    gpt = GPTDataset(ds, str(tmp_path / "d"), np.arange(5), None, "train", config(tmp_path))
    sample = gpt[0]
    # Megatron's default (create_attention_mask): [1, s, s] bool, True = masked, i.e. the future.
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    mask = sample["attention_mask"]
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(mask[0], torch.tril(torch.ones(8, 8)) < 0.5)
    assert torch.equal(gpt[1]["attention_mask"], mask)
    assert sample["loss_mask"].dtype == torch.float32 and sample["loss_mask"].tolist() == [1.0] * 8
    assert sample["position_ids"].tolist() == list(range(8))
    # --no-create-attention-mask-in-dataloader: the same sample without the mask.
    off = GPTDataset(
        ds, str(tmp_path / "d"), np.arange(5), None, "train", config(tmp_path, create_attention_mask=False)
    )
    plain = off[0]
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(torch.equal(plain[k], sample[k]) for k in plain)
    masked = GPTDataset(
        ds,
        str(tmp_path / "d"),
        np.arange(5),
        None,
        "train",
        config(tmp_path, create_attention_mask=False, eod_mask_loss=True),
    )
    assert "attention_mask" not in masked[0]


def test_masks_on_a_tiny_dataset(tmp_path):
    prefix = str(tmp_path / "tiny")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2, EOD])
        b.add_document([3, EOD])
        b.add_document([4, 5, 6, EOD])
        b.finalize()
    ds = IndexedDataset(prefix)
    cfg = config(tmp_path, seq=8, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    gpt = GPTDataset(ds, prefix, np.arange(3), None, "train", cfg)
    assert len(gpt) == 1
    sample = gpt[0]
    tokens = sample["tokens"].tolist()
    # One epoch in shuffled document order; find where each document went.
    order = [int(d) for d in gpt.document_index]
    stream = [t for d in order for t in ([[1, 2, EOD], [3, EOD], [4, 5, 6, EOD]][d])]
    assert tokens == stream[:8] and sample["labels"].tolist() == stream[1:9]
    eods = [i for i, t in enumerate(tokens) if t == EOD]
    assert sample["loss_mask"].tolist() == [0.0 if t == EOD else 1.0 for t in tokens]
    expected_pos, p = [], 0
    for t in tokens:
        expected_pos.append(p)
        p = 0 if t == EOD else p + 1
    assert sample["position_ids"].tolist() == expected_pos
    mask = sample["attention_mask"]
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.bool
    segment = [sum(1 for e in eods if e < i) for i in range(8)]
    expected_mask = [[k > q or segment[k] != segment[q] for k in range(8)] for q in range(8)]
    assert mask[0].tolist() == expected_mask


def test_mask_function_against_megatron_loop():
    tokens = torch.tensor([5, 0, 7, 7, 0, 0, 3, 4, 0, 1])
    attention, loss, position = get_ltor_masks_and_position_ids(tokens, 0, True, True, True)
    assert position.tolist() == [0, 1, 0, 1, 2, 0, 0, 1, 2, 0]
    assert loss.tolist() == [1, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    # Megatron's loop: for each eod at i, rows after i may not see columns up to i.
    expected = torch.tril(torch.ones(10, 10))
    for i in (1, 4, 5, 8):
        expected[i + 1 :, : i + 1] = 0
    assert torch.equal(attention[0], expected < 0.5)
    attention, loss, position = get_ltor_masks_and_position_ids(tokens, 0, False, False, False)
    assert attention is None and position.tolist() == list(range(10)) and loss.tolist() == [1.0] * 10
    attention, _, _ = get_ltor_masks_and_position_ids(
        tokens, 0, False, False, False, create_attention_mask=True
    )
    assert torch.equal(attention[0], torch.tril(torch.ones(10, 10)) < 0.5)


def test_index_build_is_vectorised_and_fast(tmp_path):
    sizes = np.random.default_rng(0).integers(1, 2000, size=300_000).astype(np.int32)
    start = time.perf_counter()
    out = build_gpt_indices(sizes, np.arange(len(sizes)), None, 1024, seed=1)
    assert time.perf_counter() - start < 3.0
    assert len(out["shuffle_index"]) == (int(sizes.sum()) - 1) // 1024


def test_causal_mask_in_the_batch_changes_no_loss(tmp_path):
    # The training loop hands batch["attention_mask"] to the model; the plain causal mask must give the
    # model's own causal attention, so a run with and without the mask computes the same losses.
    from helpers import tiny_config

    from megatron_lite.core.models.gpt import GPTModel
    from megatron_lite.parallel_state import ParallelState

    ds, _ = make_dataset(tmp_path / "d", [40] * 20)
    on = GPTDataset(ds, str(tmp_path / "d"), np.arange(20), None, "train", config(tmp_path, seq=16))
    off = GPTDataset(
        ds,
        str(tmp_path / "d"),
        np.arange(20),
        None,
        "train",
        config(tmp_path, seq=16, create_attention_mask=False),
    )
    batch_on = torch.utils.data.default_collate([on[i] for i in range(4)])
    batch_off = torch.utils.data.default_collate([off[i] for i in range(4)])
    assert batch_on["attention_mask"].shape == (4, 1, 16, 16) and "attention_mask" not in batch_off
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=128, attention_dropout=0.0, hidden_dropout=0.0), ParallelState())
    model.eval()
    losses = [
        model(
            b["tokens"],
            position_ids=b["position_ids"],
            attention_mask=b.get("attention_mask"),
            labels=b["labels"],
        )
        for b in (batch_on, batch_off)
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_no_mmap_gives_identical_samples(tmp_path):
    ds, _ = make_dataset(tmp_path / "d", [int(n) for n in np.random.default_rng(5).integers(1, 60, size=50)])
    read = IndexedDataset(str(tmp_path / "d"), mmap_bin_files=False)
    cfg = config(tmp_path, seq=16, reset_position_ids=True, reset_attention_mask=True)
    a = GPTDataset(ds, str(tmp_path / "d"), np.arange(50), 120, "train", cfg)
    b = GPTDataset(read, str(tmp_path / "d"), np.arange(50), 120, "train", cfg)
    assert len(a) == len(b) >= 120
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
