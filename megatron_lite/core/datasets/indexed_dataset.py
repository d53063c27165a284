"""Megatron's MMIDIDX .bin/.idx token store: a validating reader (memory-mapped or seek+read .bin)."""

from __future__ import annotations

import os
import struct

import numpy as np

from megatron_lite.errors import fail

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

# Arrays are checked and copied in pieces of this many entries so that memory stays bounded however
# large the dataset is.
_CHUNK = 1 << 22


def idx_path_of(path_prefix: str) -> str:
    return f"{path_prefix}.idx"


def bin_path_of(path_prefix: str) -> str:
    return f"{path_prefix}.bin"


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Megatron's choice of token dtype: uint16 when every id fits comfortably, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def exists(path_prefix: str) -> bool:
    return os.path.isfile(idx_path_of(path_prefix)) and os.path.isfile(bin_path_of(path_prefix))


class IndexedDataset:
    """A read-only view of `{prefix}.bin/.idx`; the index is checked in full on opening.

    The .idx is always memory-mapped. The .bin is memory-mapped too unless `mmap_bin_files` is False
    (--no-mmap-bin-files): then each read opens the file, seeks and reads into a fresh array, as
    Megatron's _FileBinReader does, for file systems where mapping large files is slow or unsafe.
    """

    def __init__(self, path_prefix: str, mmap_bin_files: bool = True) -> None:
        self.path_prefix = str(path_prefix)
        self.mmap_bin_files = bool(mmap_bin_files)
        self.idx_path = idx_path_of(self.path_prefix)
        self.bin_path = bin_path_of(self.path_prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                fail(
                    f"{path}: not found; a dataset is a .bin/.idx pair written by tools/preprocess_data.py, "
                    "named by its prefix (without .bin/.idx) in --data-path"
                )
        self._read_index()
        self._open_bin()

    def __getstate__(self) -> tuple[str, bool]:
        # DataLoader workers started with spawn get the prefix and open the files themselves instead of
        # receiving a copy of the whole .bin.
        return self.path_prefix, self.mmap_bin_files

    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def _read_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            fail(
                f"{path}: not a Megatron indexed dataset (bad magic {head[:9]!r}); give the prefix of a .idx file"
            )
        if len(head) < HEADER.size:
            fail(f"{path}: truncated ({size} bytes, the header alone is {HEADER.size}); re-run preprocessing")
        _, version, code, n_seq, n_doc = HEADER.unpack(head)
        if version != VERSION:
            fail(f"{path}: index version {version} is not supported (only {VERSION}); re-run preprocessing")
        if code not in DTYPE_CODES:
            fail(f"{path}: unknown token dtype code {code} (known: 1-8); the index is corrupt")
        self.dtype = DTYPE_CODES[code]
        self.itemsize = np.dtype(self.dtype).itemsize
        expected = HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if size == expected:
            self.multimodal = False
        elif size == expected + n_seq:
            self.multimodal = True
        else:
            problem = "truncated" if size < expected else "longer than its header says"
            fail(
                f"{path}: {problem}: the header promises {n_seq} sequences and {n_doc} document entries "
                f"({expected} bytes) but the file has {size} bytes; re-run preprocessing"
            )
        self._idx_map = np.memmap(path, dtype=np.uint8, mode="r")
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx_map, dtype=np.int32, count=n_seq, offset=offset)
        offset += n_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx_map, dtype=np.int64, count=n_seq, offset=offset)
        offset += n_seq * 8
        self.document_indices = np.frombuffer(self._idx_map, dtype=np.int64, count=n_doc, offset=offset)
        offset += n_doc * 8
        self.sequence_modes = (
            np.frombuffer(self._idx_map, dtype=np.int8, count=n_seq, offset=offset)
            if self.multimodal
            else None
        )
        self.num_tokens = self._check_index()

    def _check_index(self) -> int:
        """Check lengths, pointers and document indices against each other; return the token count."""
        path, lengths, pointers, docs = (
            self.idx_path,
            self.sequence_lengths,
            self.sequence_pointers,
            self.document_indices,
        )
        n_seq = len(lengths)
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n_seq:
            first = docs[0] if len(docs) else None
            last = docs[-1] if len(docs) else None
            fail(
                f"{path}: document indices must run from 0 to the sequence count {n_seq}, found {first}..{last}; "
                "the index is corrupt, re-run preprocessing"
            )
        for start in range(0, len(docs), _CHUNK):
            piece = docs[max(start - 1, 0) : start + _CHUNK]
            if np.any(np.diff(piece) < 0):
                fail(f"{path}: document indices decrease; the index is corrupt, re-run preprocessing")
        total_bytes = 0
        for start in range(0, n_seq, _CHUNK):
            size = lengths[start : start + _CHUNK].astype(np.int64)
            if size.min() < 0:
                fail(f"{path}: negative sequence length; the index is corrupt, re-run preprocessing")
            ends = np.cumsum(size * self.itemsize) + total_bytes
            expected_pointers = ends - size * self.itemsize
            bad = np.flatnonzero(pointers[start : start + _CHUNK] != expected_pointers)
            if len(bad):
                i = start + int(bad[0])
                fail(
                    f"{path}: sequence {i} starts at byte {pointers[i]} but the lengths before it put it at "
                    f"{expected_pointers[bad[0]]}; the index is corrupt, re-run preprocessing"
                )
            total_bytes = int(ends[-1])
        return total_bytes // self.itemsize

    def _open_bin(self) -> None:
        size = os.path.getsize(self.bin_path)
        expected = self.num_tokens * self.itemsize
        if size != expected:
            fail(
                f"{self.bin_path}: {size} bytes, but {self.idx_path} describes {self.num_tokens} tokens "
                f"({expected} bytes); the pair is mismatched or truncated, re-run preprocessing"
            )
        if not self.mmap_bin_files:
            self._bin = None
        elif size:
            self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self._bin = np.zeros(0, dtype=self.dtype)  # numpy cannot map an empty file

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens start:start+count of the .bin (a view of the map, or a new array read from the file)."""
        if self._bin is not None:
            return np.asarray(self._bin[start : start + count])
        out = np.empty(count, dtype=self.dtype)
        # A fresh unbuffered handle per read: no file position shared with forked DataLoader workers.
        with open(self.bin_path, "rb", buffering=0) as f:
            f.seek(start * self.itemsize)
            view = memoryview(out).cast("B")
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.bin_path}: ended {len(view) - done} bytes early; was it truncated?")
                done += n
        return out

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous")
            if start >= stop:
                return []
            first = self.sequence_pointers[start] // self.itemsize
            sizes = self.sequence_lengths[start:stop].astype(np.int64)
            block = self._read(int(first), int(sizes.sum()))
            return np.split(block, np.cumsum(sizes)[:-1])
        return self.get(int(idx))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence `idx` (the rest of it when length is None)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {n} sequences in {self.path_prefix}")
        idx %= n
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens {offset}:{offset + length} out of range for sequence {idx} of {size} tokens"
            )
        start = int(self.sequence_pointers[idx]) // self.itemsize + offset
        return self._read(start, length)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def max_token_id(self) -> int:
        """The largest token id in the .bin (-1 when empty), read in pieces."""
        best = -1
        step = 1 << 24
        for start in range(0, self.num_tokens, step):
            best = max(best, int(self._read(start, min(step, self.num_tokens - start)).max()))
        return best
