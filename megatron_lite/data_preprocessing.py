"""JSONL text -> Megatron .bin/.idx token datasets (tools/preprocess_data.py) and merging (tools/merge_datasets.py)."""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from glob import glob
from typing import BinaryIO, TextIO

import numpy as np

from megatron_lite.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    bin_path_of,
    idx_path_of,
    optimal_dtype,
)
from megatron_lite.errors import fail
from megatron_lite.tokenizer import TOKENIZER_TYPES, build_tokenizer

# Work is handed out in blocks of whole lines of about this size: large enough that process hand-off
# costs nothing next to tokenising, small enough that a few blocks per worker in flight stay cheap.
BLOCK_BYTES = 1 << 20
INFLIGHT_PER_WORKER = 3
_GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------------------------------
# Command line


def build_preprocess_parser() -> argparse.ArgumentParser:
    """Megatron's tools/preprocess_data.py flags (the ones that apply to GPT pretraining)."""
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenise loose JSON (one object per line) into Megatron .bin/.idx datasets.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", required=True, help="a .jsonl or .jsonl.gz file, or a glob of them (sorted)"
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON fields to extract, one dataset each"
    )
    group.add_argument(
        "--keep-newlines", action="store_true", help="accepted for compatibility; newlines are always kept"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        default="GPT2BPETokenizer",
        help=f"one of {', '.join(TOKENIZER_TYPES)} (default GPT2BPETokenizer)",
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 encoder.json (default: the shipped copy)")
    group.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe (default: the shipped copy)")
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document token to each document"
    )
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=1, help="tokenising processes (output is identical for any number)"
    )
    group.add_argument(
        "--partitions", type=int, default=1, help="accepted for compatibility; only 1 is supported"
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="print progress every this many documents"
    )
    return parser


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/preprocess_data.py."""
    args = build_preprocess_parser().parse_args(argv)
    if args.partitions != 1:
        fail(f"--partitions {args.partitions} is not supported: use --workers for parallelism (same output)")
    _sigterm_as_interrupt()
    stats = preprocess(
        input_pattern=args.input,
        output_prefix=args.output_prefix,
        json_keys=args.json_keys,
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
    )
    for key, out in stats.outputs.items():
        print(
            f"Wrote {out.prefix}.bin/.idx: {out.documents} documents, {out.tokens} tokens ({out.dtype}); "
            f"dropped {out.empty} empty '{key}' documents."
        )
    return 0


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge_datasets.py",
        description="Concatenate .bin/.idx datasets into one (Megatron's add_index).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a directory: every .bin/.idx pair in it, in name order")
    source.add_argument(
        "--inputs", nargs="+", metavar="PREFIX", help="dataset prefixes, merged in the order given"
    )
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    return parser


def merge_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/merge_datasets.py."""
    args = build_merge_parser().parse_args(argv)
    _sigterm_as_interrupt()
    prefixes = find_dataset_prefixes(args.input, exclude=args.output_prefix) if args.input else args.inputs
    out = merge_datasets(prefixes, args.output_prefix)
    print(
        f"Wrote {out.prefix}.bin/.idx: {out.documents} documents, {out.tokens} tokens ({out.dtype}) from {len(prefixes)} datasets."
    )
    return 0


def _sigterm_as_interrupt() -> None:
    # A job scheduler stops us with SIGTERM; treat it like Ctrl-C so temporary files get removed.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------------------------
# Preprocessing


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
) -> PreprocessStats:
    """Tokenise every document of the input into `{output_prefix}_{key}_document.bin/.idx`.

    Output appears only when everything succeeded; on any error or interrupt the temporary files are
    removed and existing outputs are left as they were.
    """
    log = sys.stderr if log is None else log
    if workers < 1:
        fail(f"--workers {workers}: need at least 1")
    if log_interval < 1:
        fail(f"--log-interval {log_interval}: need at least 1")
    if len(set(json_keys)) != len(json_keys):
        fail(f"--json-keys {' '.join(json_keys)}: a key is listed twice")
    files = resolve_inputs(input_pattern)
    encoder = ChunkEncoder(tokenizer_type, vocab_file, merge_file, tuple(json_keys), append_eod)
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
            pool = _make_pool(workers, encoder)
            results = _ordered_results(pool, chunks, workers * INFLIGHT_PER_WORKER)
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


def resolve_inputs(pattern: str) -> list[str]:
    """The --input file, or the files a glob matches in sorted order."""
    if any(c in pattern for c in "*?["):
        files = sorted(p for p in glob(pattern, recursive=True) if not os.path.isdir(p))
        if not files:
            fail(f"--input {pattern}: no file matches this pattern")
        return files
    if os.path.isdir(pattern):
        fail(
            f"{pattern}: --input is a directory; give a .jsonl/.jsonl.gz file or a glob such as '{pattern}/*.jsonl'"
        )
    if not os.path.exists(pattern):
        fail(f"{pattern}: --input file not found")
    return [pattern]


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one input file, starting at line `first_line` (1-based)."""

    path: str
    first_line: int
    data: bytes


@dataclass
class ChunkResult:
    documents: int
    bytes: int
    tokens: list[np.ndarray]  # per key: all non-empty documents' tokens back to back
    lengths: list[np.ndarray]  # per key: tokens per document
    empty: list[int]  # per key: empty documents dropped


def read_chunks(files: Sequence[str], block_bytes: int | None = None) -> Iterator[Chunk]:
    """Stream the files as blocks of whole lines; memory is bounded by the block size and longest line."""
    block_bytes = block_bytes or BLOCK_BYTES
    for path in files:
        try:
            with open(path, "rb") as raw:
                # Peek rather than reopen, so that a pipe works as input too.
                compressed = raw.peek(2)[:2] == _GZIP_MAGIC
                f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
                yield from _line_blocks(path, f, block_bytes)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            fail(f"{path}: corrupt gzip data ({err}); re-create the file")
        except OSError as err:
            fail(f"{path}: cannot read ({err.strerror or err})")


def _line_blocks(path: str, f: BinaryIO, block_bytes: int) -> Iterator[Chunk]:
    line = 1
    pending: list[bytes] = []
    while True:
        block = f.read(block_bytes)
        if not block:
            break
        cut = block.rfind(b"\n")
        if cut < 0:
            pending.append(block)  # a line longer than a block: keep collecting
            continue
        pending.append(block[: cut + 1])
        data = b"".join(pending)
        pending = [block[cut + 1 :]]
        yield Chunk(path, line, data)
        line += data.count(b"\n")
    tail = b"".join(pending)
    if tail:
        yield Chunk(path, line, tail)


class ChunkEncoder:
    """Parse and tokenise one chunk; runs in worker processes, rebuilt there from its settings."""

    def __init__(
        self,
        tokenizer_type: str,
        vocab_file: str | None,
        merge_file: str | None,
        json_keys: tuple[str, ...],
        append_eod: bool,
    ) -> None:
        self.settings = (tokenizer_type, vocab_file, merge_file, json_keys, append_eod)
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
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


def _make_pool(workers: int, encoder: ChunkEncoder) -> ProcessPoolExecutor:
    # fork hands the already-built tokenizer to the workers for free; spawn rebuilds it from settings.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=(encoder,),
    )


def _ordered_results(
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


# ---------------------------------------------------------------------------------------------------
# Merging


def find_dataset_prefixes(directory: str, exclude: str | None = None) -> list[str]:
    """Every .bin/.idx pair in `directory`, sorted by name; a file without its partner is an error."""
    if not os.path.isdir(directory):
        fail(f"{directory}: --input directory not found")
    names = sorted(os.listdir(directory))
    stems = {os.path.splitext(n)[0] for n in names if n.endswith((".bin", ".idx"))}
    skip = os.path.abspath(exclude) if exclude else None
    prefixes = []
    for stem in sorted(stems):
        prefix = os.path.join(directory, stem)
        if os.path.abspath(prefix) == skip:
            continue
        for path, other in (
            (idx_path_of(prefix), bin_path_of(prefix)),
            (bin_path_of(prefix), idx_path_of(prefix)),
        ):
            if os.path.isfile(path) and not os.path.isfile(other):
                fail(
                    f"{path}: no matching {os.path.basename(other)} next to it; each dataset is a .bin/.idx pair"
                )
        prefixes.append(prefix)
    if not prefixes:
        fail(f"{directory}: no .bin/.idx pairs to merge")
    return prefixes


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> OutputStats:
    """Concatenate datasets in the order given into `{output_prefix}.bin/.idx` (all-or-nothing)."""
    prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in prefixes]
    dtype = IndexedDataset(prefixes[0]).dtype
    try:
        with IndexedDatasetBuilder(output_prefix, dtype) as builder:
            for prefix in prefixes:
                builder.add_index(prefix)
            builder.finalize()
    except OSError as err:
        fail(
            f"{err.filename or output_prefix}: cannot write the output ({err.strerror or err}); check --output-prefix"
        )
    return OutputStats(
        prefix=output_prefix,
        dtype=np.dtype(dtype).name,
        documents=builder.num_documents,
        tokens=builder.num_tokens,
    )
