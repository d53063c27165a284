"""The MMIDIDX format: a hand-written index is read right, the builder writes it, corrupt files are refused."""

import copy
import os
import struct

import numpy as np
import pytest

from megatron_lite.core.datasets.indexed_dataset import IndexedDataset, optimal_dtype
from megatron_lite.core.datasets.indexed_dataset_builder import IndexedDatasetBuilder
from megatron_lite.errors import UserError


def write_by_hand(prefix, sequences, doc_ends, dtype=np.uint16, code=8, version=1, magic=b"MMIDIDX\x00\x00"):
    """An .idx/.bin pair written straight from the format description (little-endian, no padding)."""
    lengths = [len(s) for s in sequences]
    itemsize = np.dtype(dtype).itemsize
    pointers = list(np.cumsum([0] + [n * itemsize for n in lengths])[:-1])
    docs = [0] + list(doc_ends)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(magic)
        f.write(struct.pack("<Q", version))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(docs)}q", *docs))
    with open(f"{prefix}.bin", "wb") as f:
        for s in sequences:
            f.write(np.asarray(s, dtype=dtype).tobytes())


SEQUENCES = [[5, 6, 7], [8], [9, 10, 11, 12], [], [50256, 1]]
DOC_ENDS = [2, 3, 3, 5]  # doc0 = seq 0-1, doc1 = seq 2, doc2 empty, doc3 = seq 3-4


def test_reads_hand_written_index(tmp_path):
    prefix = str(tmp_path / "hand")
    write_by_hand(prefix, SEQUENCES, DOC_ENDS)
    ds = IndexedDataset(prefix)
    assert ds.dtype is np.uint16
    assert len(ds) == 5 and ds.num_documents == 4
    assert ds.sequence_lengths.tolist() == [3, 1, 4, 0, 2]
    assert ds.sequence_pointers.tolist() == [0, 6, 8, 16, 16]
    assert ds.document_indices.tolist() == [0, 2, 3, 3, 5]
    assert [x.tolist() for x in (ds[i] for i in range(5))] == SEQUENCES
    assert ds[-1].tolist() == [50256, 1]
    assert ds.get(2, offset=1, length=2).tolist() == [10, 11]
    assert ds.get(2, offset=3).tolist() == [12]
    assert [x.tolist() for x in ds[1:3]] == [[8], [9, 10, 11, 12]]
    assert ds.max_token_id() == 50256
    assert ds.num_tokens == 10
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    # Copies (and pickles, for spawned DataLoader workers) reopen the files instead of copying them.
    clone = copy.deepcopy(ds)
    assert isinstance(clone._bin, np.memmap) and clone[4].tolist() == [50256, 1]


def test_builder_writes_the_same_bytes_as_the_format(tmp_path):
    write_by_hand(str(tmp_path / "hand"), SEQUENCES, DOC_ENDS)
    with IndexedDatasetBuilder(str(tmp_path / "built"), np.uint16) as builder:
        builder.add_document([5, 6, 7, 8], lengths=[3, 1])
        builder.add_item(np.array([9, 10, 11, 12]))
        builder.end_document()
        builder.end_document()  # an empty document repeats the previous end
        builder.add_document(np.array([50256, 1]), lengths=[0, 2])
        builder.finalize()
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"built{ext}").read_bytes() == (tmp_path / f"hand{ext}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["built.bin", "built.idx", "hand.bin", "hand.idx"]


def test_add_documents_and_add_index(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=n).astype(np.int32) for n in (3, 0, 7, 1, 12)]
    with IndexedDatasetBuilder(str(tmp_path / "a"), np.int32) as b:
        b.add_documents(np.concatenate(docs[:2]), [3, 0])
        b.finalize()
    with IndexedDatasetBuilder(str(tmp_path / "b"), np.int32) as b:
        b.add_documents(np.concatenate(docs[2:]), [7, 1, 12])
        b.finalize()
    with IndexedDatasetBuilder(str(tmp_path / "all"), np.int32) as b:
        b.add_documents(np.concatenate(docs), [len(d) for d in docs])
        b.finalize()
    with IndexedDatasetBuilder(str(tmp_path / "merged"), np.int32) as b:
        b.add_index(str(tmp_path / "a"))
        b.add_index(str(tmp_path / "b"))
        b.finalize()
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"all{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert ds.dtype is np.int32 and ds.document_indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds[4].tolist() == docs[4].tolist()


def test_add_index_refuses_other_dtype(tmp_path):
    write_by_hand(str(tmp_path / "u16"), SEQUENCES, DOC_ENDS)
    with (
        IndexedDatasetBuilder(str(tmp_path / "out"), np.int32) as b,
        pytest.raises(UserError, match="u16.idx: tokens are uint16"),
    ):
        b.add_index(str(tmp_path / "u16"))
    assert sorted(os.listdir(tmp_path)) == ["u16.bin", "u16.idx"]


def test_builder_is_atomic(tmp_path):
    prefix = str(tmp_path / "out")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2, 3])
        b.finalize()
    good = (tmp_path / "out.idx").read_bytes(), (tmp_path / "out.bin").read_bytes()
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([4, 5])
        raise RuntimeError("boom")
    assert ((tmp_path / "out.idx").read_bytes(), (tmp_path / "out.bin").read_bytes()) == good
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]
    with IndexedDatasetBuilder(str(tmp_path / "new" / "deep" / "x"), np.uint16) as b:
        b.add_document([1])  # leaving without finalize keeps nothing, not even the directories
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]


def test_optimal_dtype():
    assert optimal_dtype(50257) is np.uint16
    assert optimal_dtype(257) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(100277) is np.int32


def _corrupt(tmp_path, mutate):
    prefix = str(tmp_path / "d")
    write_by_hand(prefix, SEQUENCES, DOC_ENDS)
    idx = bytearray((tmp_path / "d.idx").read_bytes())
    bin_ = bytearray((tmp_path / "d.bin").read_bytes())
    idx, bin_ = mutate(idx, bin_)
    (tmp_path / "d.idx").write_bytes(bytes(idx))
    (tmp_path / "d.bin").write_bytes(bytes(bin_))
    with pytest.raises(UserError) as err:
        IndexedDataset(prefix)
    return str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"nothing\.idx: not found"):
        IndexedDataset(str(tmp_path / "nothing"))
    write_by_hand(str(tmp_path / "d"), SEQUENCES, DOC_ENDS)
    os.remove(tmp_path / "d.bin")
    with pytest.raises(UserError, match=r"d\.bin: not found"):
        IndexedDataset(str(tmp_path / "d"))


def test_wrong_magic(tmp_path):
    message = _corrupt(tmp_path, lambda i, b: (b"XXXXXXX\x00\x00" + i[9:], b))
    assert "d.idx: not a Megatron indexed dataset" in message


def test_wrong_version(tmp_path):
    message = _corrupt(tmp_path, lambda i, b: (i[:9] + struct.pack("<Q", 2) + i[17:], b))
    assert "d.idx: index version 2 is not supported" in message


def test_unknown_dtype_code(tmp_path):
    message = _corrupt(tmp_path, lambda i, b: (i[:17] + bytes([9]) + i[18:], b))
    assert "d.idx: unknown token dtype code 9" in message


def test_truncated_index(tmp_path):
    message = _corrupt(tmp_path, lambda i, b: (i[:-5], b))
    assert "d.idx: truncated" in message
    message = _corrupt(tmp_path, lambda i, b: (i[:20], b))
    assert "d.idx: truncated" in message


def test_bin_size_mismatch(tmp_path):
    message = _corrupt(tmp_path, lambda i, b: (i, b[:-2]))
    assert "d.bin: 18 bytes, but" in message and "describes 10 tokens (20 bytes)" in message


def test_inconsistent_pointers_and_documents(tmp_path):
    pointers_at = 34 + 5 * 4
    message = _corrupt(
        tmp_path, lambda i, b: (i[: pointers_at + 8] + struct.pack("<q", 4) + i[pointers_at + 16 :], b)
    )
    assert "d.idx: sequence 1 starts at byte 4" in message
    docs_at = 34 + 5 * 12
    message = _corrupt(tmp_path, lambda i, b: (i[:docs_at] + struct.pack("<q", 1) + i[docs_at + 8 :], b))
    assert "d.idx: document indices must run from 0" in message


def test_no_mmap_reads_the_same_tokens(tmp_path):
    # --no-mmap-bin-files: seek+readinto per read gives exactly the memory map's tokens.
    prefix = str(tmp_path / "hand")
    write_by_hand(prefix, SEQUENCES, DOC_ENDS)
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap_bin_files=False)
    assert read._bin is None and isinstance(mapped._bin, np.memmap)
    for i in range(5):
        got = read[i]
        assert got.dtype == np.uint16 and got.tolist() == mapped[i].tolist() == SEQUENCES[i]
    assert read.get(2, offset=1, length=2).tolist() == [10, 11]
    assert [x.tolist() for x in read[1:5]] == [x.tolist() for x in mapped[1:5]]
    assert read.max_token_id() == mapped.max_token_id() == 50256
    clone = copy.deepcopy(read)
    assert clone._bin is None and clone.mmap_bin_files is False and clone[4].tolist() == [50256, 1]
    # A read result is its own array, not a view of a buffer that the next read reuses.
    first, second = read[0], read[2]
    assert first.tolist() == SEQUENCES[0] and second.tolist() == SEQUENCES[2]


def test_no_mmap_never_maps_the_bin(tmp_path, monkeypatch):
    # --no-mmap-bin-files: only the .idx is memory-mapped (as in Megatron); every .bin read is seek+read.
    prefix = str(tmp_path / "hand")
    write_by_hand(prefix, SEQUENCES, DOC_ENDS)
    mapped = []
    real_memmap = np.memmap

    def spy(filename, *args, **kwargs):
        mapped.append(os.path.basename(str(filename)))
        return real_memmap(filename, *args, **kwargs)

    monkeypatch.setattr(np, "memmap", spy)
    read = IndexedDataset(prefix, mmap_bin_files=False)
    tokens = [read[i].tolist() for i in range(len(read))] + [x.tolist() for x in read[0:5]]
    tokens.append(read.get(2, offset=1, length=2).tolist())
    assert mapped == ["hand.idx"] and read.max_token_id() == 50256 and mapped == ["hand.idx"]
    assert tokens == SEQUENCES + SEQUENCES + [[10, 11]]
    # The default maps the .bin too, and reads the same tokens.
    mapped.clear()
    default = IndexedDataset(prefix)
    assert mapped == ["hand.idx", "hand.bin"]
    assert [default[i].tolist() for i in range(len(default))] == SEQUENCES


def test_no_mmap_on_a_large_random_dataset(tmp_path):
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 3000, size=200)
    tokens = rng.integers(0, 2**31 - 1, size=int(lengths.sum())).astype(np.int32)
    with IndexedDatasetBuilder(str(tmp_path / "big"), np.int32) as b:
        b.add_documents(tokens, lengths)
        b.finalize()
    mapped = IndexedDataset(str(tmp_path / "big"))
    read = IndexedDataset(str(tmp_path / "big"), mmap_bin_files=False)
    for i in rng.integers(0, 200, size=50):
        np.testing.assert_array_equal(read[int(i)], mapped[int(i)])
    assert read.max_token_id() == int(tokens.max())
