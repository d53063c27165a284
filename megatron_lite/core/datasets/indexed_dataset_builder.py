"""IndexedDatasetBuilder: writes Megatron's MMIDIDX .bin/.idx pair atomically, in bounded memory."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from types import TracebackType

import numpy as np

from megatron_lite.core.datasets.indexed_dataset import (
    _CHUNK,
    CODE_OF_DTYPE,
    HEADER,
    MAGIC,
    VERSION,
    IndexedDataset,
    bin_path_of,
    idx_path_of,
)
from megatron_lite.errors import fail

_COPY_BUFFER = 16 << 20


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
