"""Writing preprocessing output: tokenised chunks into one .bin/.idx shard per JSON key, all-or-nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from megatron_lite.core.datasets.indexed_dataset import optimal_dtype
from megatron_lite.core.datasets.indexed_dataset_builder import IndexedDatasetBuilder
from megatron_lite.core.datasets.preprocessing.encoding import (
    INFLIGHT_PER_WORKER,
    ChunkEncoder,
    ChunkResult,
    make_pool,
    ordered_results,
)
from megatron_lite.core.datasets.preprocessing.inputs import read_chunks, resolve_inputs
from megatron_lite.errors import fail


@dataclass
class OutputStats:
    prefix: str
    dtype: str
    documents: int = 0
    tokens: int = 0
    empty: int = 0


@dataclass
class PreprocessStats:
    files: list[str]
    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: dict[str, OutputStats] = field(default_factory=dict)


def preprocess(
    input_pattern: str,
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    tokenizer_type: str = "GPT2BPETokenizer",
    vocab_file: str | None = None,
    merge_file: str | None = None,
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    log: TextIO | None = None,
    tokenizer_options: Mapping[str, Any] | None = None,
) -> PreprocessStats:
    """Tokenise every document of the input into `{output_prefix}_{key}_document.bin/.idx`.

    `tokenizer_options` are the other tokenizer settings by config name (tokenizer_model, vocab_size,
    tiktoken_pattern, ...). Output appears only when everything succeeded; on any error or interrupt
    the temporary files are removed and existing outputs are left as they were.
    """
    log = sys.stderr if log is None else log
    if workers < 1:
        fail(f"--workers {workers}: need at least 1")
    if log_interval < 1:
        fail(f"--log-interval {log_interval}: need at least 1")
    if len(set(json_keys)) != len(json_keys):
        fail(f"--json-keys {' '.join(json_keys)}: a key is listed twice")
    files = resolve_inputs(input_pattern)
    encoder = ChunkEncoder(
        tokenizer_type, vocab_file, merge_file, tuple(json_keys), append_eod, tokenizer_options
    )
    dtype = np.dtype(optimal_dtype(encoder.tokenizer.vocab_size))
    stats = PreprocessStats(files=files)
    builders: list[IndexedDatasetBuilder] = []
    pool: ProcessPoolExecutor | None = None
    start = time.perf_counter()
    try:
        for key in json_keys:
            prefix = f"{output_prefix}_{key}_document"
            builders.append(IndexedDatasetBuilder(prefix, dtype))
            stats.outputs[key] = OutputStats(prefix=prefix, dtype=dtype.name)
        chunks = read_chunks(files)
        if workers == 1:
            results: Iterator[ChunkResult] = (encoder(chunk) for chunk in chunks)
        else:
            pool = make_pool(workers, encoder)
            results = ordered_results(pool, chunks, workers * INFLIGHT_PER_WORKER)
        logged = 0
        for result in results:
            for builder, key, tokens, lengths, empty in zip(
                builders, json_keys, result.tokens, result.lengths, result.empty
            ):
                builder.add_documents(tokens, lengths)
                out = stats.outputs[key]
                out.documents += len(lengths)
                out.tokens += len(tokens)
                out.empty += empty
            stats.documents += result.documents
            stats.bytes += result.bytes
            if stats.documents // log_interval > logged // log_interval:
                _log_progress(log, stats, time.perf_counter() - start)
                logged = stats.documents
        if stats.documents == 0:
            where = files[0] if len(files) == 1 else f"{len(files)} files"
            fail(f"--input {input_pattern}: no documents (no JSON lines in {where})")
        for key, out in stats.outputs.items():
            if out.documents == 0:
                fail(
                    f"--input {input_pattern}: every document's '{key}' is empty; nothing to write (check --json-keys)"
                )
        # Everything is written under temporary names first so that a failure here leaves no half pair.
        for builder in builders:
            builder.close()
        for builder in builders:
            builder.commit()
        stats.seconds = time.perf_counter() - start
        _log_progress(log, stats, stats.seconds)
        return stats
    except BrokenProcessPool:
        fail("a --workers process died unexpectedly (out of memory?); retry with fewer --workers")
    except OSError as err:
        fail(
            f"{err.filename or output_prefix}: cannot write the output ({err.strerror or err}); check --output-prefix"
        )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for builder in builders:
            builder.abort()


def _log_progress(log: TextIO, stats: PreprocessStats, seconds: float) -> None:
    seconds = max(seconds, 1e-9)
    print(
        f"Processed {stats.documents} documents ({stats.documents / seconds:.1f} docs/s, "
        f"{stats.bytes / seconds / 1e6:.2f} MB/s).",
        file=log,
        flush=True,
    )
