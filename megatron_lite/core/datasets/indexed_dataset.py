"""Megatron's MMIDIDX .bin/.idx token store: a validating memory-mapped reader and an atomic builder."""

from __future__ import annotations

import os
import secrets
import shutil
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType

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
_COPY_BUFFER = 16 << 20


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
    """A read-only view of `{prefix}.bin/.idx`; the index is checked in full on opening."""

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = str(path_prefix)
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

    def __getstate__(self) -> str:
        # DataLoader workers started with spawn get the prefix and map the files themselves instead of
        # receiving a copy of the whole .bin.
        return self.path_prefix

    def __setstate__(self, path_prefix: str) -> None:
        self.__init__(path_prefix)  # type: ignore[misc]

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
        # numpy cannot map an empty file; an empty dataset simply has nothing to read.
        self._bin = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, dtype=self.dtype)
        )

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
            block = self._bin[first : first + sizes.sum()]
            return np.split(np.asarray(block), np.cumsum(sizes)[:-1])
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
        return np.asarray(self._bin[start : start + length])

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def max_token_id(self) -> int:
        """The largest token id in the .bin (-1 when empty), read in pieces."""
        best = -1
        step = 1 << 24
        for start in range(0, len(self._bin), step):
            best = max(best, int(self._bin[start : start + step].max()))
        return best


class IndexedDatasetBuilder:
    """Write `{prefix}.bin/.idx` under temporary names; `finalize()` renames them into place.

    Lengths and document ends go to side files while writing, so memory does not grow with the
    corpus. Used as a context manager, an exception (or leaving without `finalize`) removes every
    temporary file and never touches an existing dataset of the same name.
    """

    def __init__(self, path_prefix: str, dtype: type[np.number] | np.dtype = np.int32) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no MMIDIDX code")
        self.path_prefix = str(path_prefix)
        self._final = (bin_path_of(self.path_prefix), idx_path_of(self.path_prefix))
        directory = os.path.dirname(os.path.abspath(self.path_prefix))
        self._made_dirs = _make_dirs(directory)
        tag = f".{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self._tmp_bin = self._final[0] + tag
        self._tmp_idx = self._final[1] + tag
        self._tmp_lengths = self._final[1] + ".lengths" + tag
        self._tmp_docs = self._final[1] + ".docs" + tag
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = open(self._tmp_lengths, "wb")
        self._docs = open(self._tmp_docs, "wb")
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._pending_sequences = 0
        self._closed = False
        self._committed = False

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.abort()

    def temp_paths(self) -> list[str]:
        return [self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs]

    def _write_tokens(self, tokens: np.ndarray | Sequence[int]) -> int:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and not np.can_cast(arr.dtype, self.dtype):
                info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else np.finfo(self.dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise ValueError(f"token ids {arr.min()}..{arr.max()} do not fit {self.dtype}")
            arr = arr.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(arr).tobytes())
        self.num_tokens += arr.size
        return arr.size

    def add_item(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one sequence to the current document."""
        n = self._write_tokens(tokens)
        self._lengths.write(np.array([n], dtype=np.int32).tobytes())
        self.num_sequences += 1

    def end_document(self) -> None:
        """Close the current document (an empty one repeats the previous end, as Megatron does)."""
        self._docs.write(np.array([self.num_sequences], dtype=np.int64).tobytes())
        self.num_documents += 1

    def add_document(self, tokens: np.ndarray | Sequence[int], lengths: Sequence[int] | None = None) -> None:
        """Append one document: `tokens` holds its sequences back to back, `lengths` their sizes."""
        arr = np.asarray(tokens)
        sizes = np.array([arr.size] if lengths is None else lengths, dtype=np.int64)
        if sizes.sum() != arr.size:
            raise ValueError(f"sequence lengths sum to {sizes.sum()} but the document has {arr.size} tokens")
        self._write_tokens(arr)
        self._lengths.write(sizes.astype(np.int32).tobytes())
        self.num_sequences += len(sizes)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` flat, `lengths` one per document."""
        sizes = np.asarray(lengths, dtype=np.int64)
        if sizes.sum() != np.asarray(tokens).size:
            raise ValueError(
                f"document lengths sum to {sizes.sum()} but {np.asarray(tokens).size} tokens given"
            )
        self._write_tokens(tokens)
        self._lengths.write(sizes.astype(np.int32).tobytes())
        ends = self.num_sequences + np.arange(1, len(sizes) + 1, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.num_sequences += len(sizes)
        self.num_documents += len(sizes)

    def add_index(self, path_prefix: str) -> None:
        """Append a whole existing dataset (Megatron's add_index): its tokens, sequences and documents."""
        other = IndexedDataset(path_prefix)
        if np.dtype(other.dtype) != self.dtype:
            fail(
                f"{other.idx_path}: tokens are {np.dtype(other.dtype).name} but the datasets before it are "
                f"{self.dtype.name}; merge only datasets made with the same tokenizer"
            )
        self._bin.flush()
        with open(other.bin_path, "rb") as src:
            shutil.copyfileobj(src, self._bin, _COPY_BUFFER)
        self.num_tokens += other.num_tokens
        for start in range(0, len(other), _CHUNK):
            self._lengths.write(
                np.ascontiguousarray(other.sequence_lengths[start : start + _CHUNK]).tobytes()
            )
        for start in range(1, len(other.document_indices), _CHUNK):
            piece = other.document_indices[start : start + _CHUNK] + self.num_sequences
            self._docs.write(piece.tobytes())
        self.num_sequences += len(other)
        self.num_documents += other.num_documents
        del other

    def close(self) -> None:
        """Write the index to its temporary name; nothing is visible under the final names yet."""
        if self._closed:
            return
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        self._closed = True
        with open(self._tmp_idx, "wb") as out:
            out.write(
                HEADER.pack(
                    MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], self.num_sequences, self.num_documents + 1
                )
            )
            _copy_file(self._tmp_lengths, out)
            for pointers in _pointers(self._tmp_lengths, self.dtype.itemsize):
                out.write(pointers.tobytes())
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            _copy_file(self._tmp_docs, out)
        for path in (self._tmp_lengths, self._tmp_docs):
            os.remove(path)

    def commit(self) -> None:
        """Move the finished files into place: the .bin first, then the .idx that describes it."""
        self.close()
        os.replace(self._tmp_bin, self._final[0])
        os.replace(self._tmp_idx, self._final[1])
        self._committed = True

    def finalize(self) -> None:
        self.close()
        self.commit()

    def abort(self) -> None:
        """Remove every temporary file (and directories this builder created, if left empty)."""
        if self._committed:
            return
        if not self._closed:
            for f in (self._bin, self._lengths, self._docs):
                f.close()
            self._closed = True
        for path in self.temp_paths():
            if os.path.exists(path):
                os.remove(path)
        for directory in reversed(self._made_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                break


def _make_dirs(directory: str) -> list[str]:
    """Create `directory` and missing parents; return the ones created, outermost first."""
    missing: list[str] = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    missing.reverse()
    for path in missing:
        os.makedirs(path, exist_ok=True)
    return missing


def _copy_file(path: str, out: object) -> None:
    with open(path, "rb") as src:
        shutil.copyfileobj(src, out, _COPY_BUFFER)  # type: ignore[arg-type]


def _pointers(lengths_path: str, itemsize: int) -> Iterable[np.ndarray]:
    """Byte offsets of each sequence (exclusive cumulative sum), computed piece by piece."""
    offset = 0
    with open(lengths_path, "rb") as f:
        while True:
            raw = f.read(_CHUNK * 4)
            if not raw:
                return
            sizes = np.frombuffer(raw, dtype=np.int32).astype(np.int64) * itemsize
            ends = np.cumsum(sizes) + offset
            yield ends - sizes
            offset = int(ends[-1])
