"""Reading preprocessing inputs: the --input file or glob, streamed as blocks of whole JSONL lines."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from glob import glob
from typing import BinaryIO

from megatron_lite.errors import fail

# Work is handed out in blocks of whole lines of about this size: large enough that process hand-off
# costs nothing next to tokenising, small enough that a few blocks per worker in flight stay cheap.
BLOCK_BYTES = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one input file, starting at line `first_line` (1-based)."""

    path: str
    first_line: int
    data: bytes


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
