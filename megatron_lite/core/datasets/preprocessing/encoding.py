"""Encoding workers: parse a chunk's JSON lines and tokenise the chosen keys, in order, over a process pool."""

from __future__ import annotations

import json
import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_lite.core.datasets.indexed_dataset import optimal_dtype
from megatron_lite.core.datasets.preprocessing.inputs import Chunk
from megatron_lite.errors import fail
from megatron_lite.tokenizer import build_tokenizer

INFLIGHT_PER_WORKER = 3


@dataclass
class ChunkResult:
    documents: int
    bytes: int
    tokens: list[np.ndarray]  # per key: all non-empty documents' tokens back to back
    lengths: list[np.ndarray]  # per key: tokens per document
    empty: list[int]  # per key: empty documents dropped


class ChunkEncoder:
    """Parse and tokenise one chunk; runs in worker processes, rebuilt there from its settings."""

    def __init__(
        self,
        tokenizer_type: str,
        vocab_file: str | None,
        merge_file: str | None,
        json_keys: tuple[str, ...],
        append_eod: bool,
        tokenizer_options: Mapping[str, Any] | None = None,
    ) -> None:
        options = dict(tokenizer_options or {})
        self.settings = (tokenizer_type, vocab_file, merge_file, json_keys, append_eod, options)
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file, **options)
        self.dtype = np.dtype(optimal_dtype(self.tokenizer.vocab_size))

    def __getstate__(self) -> tuple:
        # Only the settings travel to a spawned worker; it builds its own tokenizer.
        return self.settings

    def __setstate__(self, settings: tuple) -> None:
        self.__init__(*settings)  # type: ignore[misc]

    def __call__(self, chunk: Chunk) -> ChunkResult:
        texts: list[list[str]] = [[] for _ in self.json_keys]
        documents = 0
        for i, raw in enumerate(chunk.data.split(b"\n")):
            if not raw or raw.isspace():
                continue
            where = f"{chunk.path}:{chunk.first_line + i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                fail(f"{where}: not valid UTF-8 (byte {err.start} of the line); convert the file to UTF-8")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                fail(
                    f"{where}: malformed JSON ({err.msg}, column {err.colno}); each line must be one JSON object"
                )
            if not isinstance(obj, dict):
                fail(
                    f"{where}: a JSON {type(obj).__name__}, not an object; each line must be one JSON object"
                )
            for key, bucket in zip(self.json_keys, texts):
                if key not in obj:
                    present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                    fail(
                        f"{where}: no key {key!r} in this JSON object (keys: {present}); choose keys with --json-keys"
                    )
                value = obj[key]
                if not isinstance(value, str):
                    fail(f"{where}: the value of {key!r} is a JSON {_json_type(value)}, not a string")
                bucket.append(value)
            documents += 1
        result = ChunkResult(documents=documents, bytes=len(chunk.data), tokens=[], lengths=[], empty=[])
        for bucket in texts:
            kept = [t for t in bucket if t]
            flat, lengths = self.tokenizer.encode_flat(kept)
            if self.append_eod and len(kept):
                flat = np.insert(flat, np.cumsum(lengths), self.tokenizer.eod)
                lengths = lengths + 1
            result.tokens.append(flat.astype(self.dtype))
            result.lengths.append(lengths.astype(np.int32))
            result.empty.append(len(bucket) - len(kept))
        return result


def _json_type(value: object) -> str:
    names = {
        bool: "boolean",
        int: "number",
        float: "number",
        list: "array",
        dict: "object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(encoder: ChunkEncoder) -> None:
    global _WORKER_ENCODER
    # Ctrl-C reaches the whole process group; only the parent should react (and clean up).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_ENCODER = encoder


def _encode_in_worker(chunk: Chunk) -> ChunkResult:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(chunk)


def make_pool(workers: int, encoder: ChunkEncoder) -> ProcessPoolExecutor:
    """`workers` processes that each hold the encoder."""
    # fork hands the already-built tokenizer to the workers for free; spawn rebuilds it from settings.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=(encoder,),
    )


def ordered_results(
    pool: ProcessPoolExecutor, chunks: Iterator[Chunk], max_inflight: int
) -> Iterator[ChunkResult]:
    """Results in input order with at most `max_inflight` chunks submitted: bounded memory, same bytes."""
    pending: deque[Future[ChunkResult]] = deque()
    for chunk in chunks:
        pending.append(pool.submit(_encode_in_worker, chunk))
        if len(pending) >= max_inflight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
